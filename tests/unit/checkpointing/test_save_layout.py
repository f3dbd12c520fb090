"""Checkpoint directory rules with a stand-in engine: atomic `latest`, `complete` marker, pruning,
interrupted saves, and clear errors for damaged checkpoints."""

import os

import pytest
import torch

from megatron.checkpointing import CheckpointError, complete_tags, read_latest_tag, read_model_state
from megatron.checkpointing.resume import TrainProgress, save_checkpoint
from megatron.neox_args import NeoXArgs

CONFIG = {
    "num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8,
    "data_path": "data/bundled/pystdlib_text_document", "train_micro_batch_size_per_gpu": 1,
    "train_iters": 10, "lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer",
}


class FakeEngine:
    """Writes what DeepSpeed writes for one rank; can fail halfway through like a killed save."""

    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # we switch `latest` ourselves
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        path = os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")
        torch.save({"module": {"w": torch.arange(4.0)}, **client_state}, path)
        if self.fail:
            raise KeyboardInterrupt("killed while writing the optimizer states")


@pytest.fixture
def args(tmp_path):
    config = dict(CONFIG, save=str(tmp_path / "ckpt"), keep_last_n_checkpoints=2)
    return NeoXArgs.from_dict(config, world_size=1)


def test_save_writes_complete_checkpoint_and_latest(args):
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=3, consumed_train_samples=3))
    save = args.checkpoint.save
    assert read_latest_tag(save) == "global_step3"
    assert complete_tags(save) == ["global_step3"]
    state, saved_args = read_model_state(save)
    assert torch.equal(state["w"], torch.arange(4.0))
    assert saved_args.model.hidden_size == 16
    assert os.path.isfile(os.path.join(save, "global_step3", "rng_state_rank0.pt"))


def test_interrupted_save_keeps_previous_checkpoint(args):
    save = args.checkpoint.save
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=2))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeEngine(fail=True), args, TrainProgress(iteration=4))
    assert read_latest_tag(save) == "global_step2"
    assert complete_tags(save) == ["global_step2"]
    assert os.path.isdir(os.path.join(save, "global_step4.partial"))  # never pointed at
    assert not os.path.exists(os.path.join(save, "global_step4"))
    # the next good save prunes the stale partial directory
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=6))
    assert not os.path.exists(os.path.join(save, "global_step4.partial"))
    assert read_latest_tag(save) == "global_step6"


def test_saving_a_step_again_keeps_the_old_copy_until_the_new_one_is_complete(args):
    """A second run saving the same step into the same directory (or a resume from an older tag)."""
    save = args.checkpoint.save
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=5, consumed_train_samples=5))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeEngine(fail=True), args, TrainProgress(iteration=5, consumed_train_samples=99))
    assert read_latest_tag(save) == "global_step5"
    state = torch.load(os.path.join(save, "global_step5", "mp_rank_00_model_states.pt"), weights_only=False)
    assert state["progress"]["consumed_train_samples"] == 5  # the old, complete copy is untouched
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=5, consumed_train_samples=7))
    state = torch.load(os.path.join(save, "global_step5", "mp_rank_00_model_states.pt"), weights_only=False)
    assert state["progress"]["consumed_train_samples"] == 7
    assert sorted(os.listdir(save)) == ["global_step5", "latest"]
    # a crash between moving the old copy aside and moving the new one in: the old copy still loads
    os.rename(os.path.join(save, "global_step5"), os.path.join(save, "global_step5.replaced"))
    assert read_latest_tag(save) == "global_step5.replaced"


def test_keep_last_n(args):
    for iteration in (1, 2, 3, 4):
        save_checkpoint(FakeEngine(), args, TrainProgress(iteration=iteration))
    assert complete_tags(args.checkpoint.save) == ["global_step3", "global_step4"]


def test_damaged_checkpoints_give_clear_errors(args, tmp_path):
    save = args.checkpoint.save
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=5))
    weights = os.path.join(save, "global_step5", "mp_rank_00_model_states.pt")
    with open(weights, "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt.*corrupted"):
        read_model_state(save)
    with open(os.path.join(save, "latest"), "w") as handle:
        handle.write("global_step9")
    with pytest.raises(CheckpointError, match="global_step9"):
        read_latest_tag(save)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_latest_tag(str(tmp_path / "nowhere"))
    os.remove(os.path.join(save, "global_step5", "complete"))
    with open(os.path.join(save, "latest"), "w") as handle:
        handle.write("global_step5")
    with pytest.raises(CheckpointError, match="incomplete"):
        read_latest_tag(save)


def test_resume_into_another_shape_or_vocabulary_names_the_keys(args):
    from megatron.checkpointing.resume import _check_compatible

    saved = NeoXArgs.from_dict(dict(CONFIG), world_size=1)
    saved.set_vocab_size(257)
    current = NeoXArgs.from_dict(dict(CONFIG, hidden_size=32, make_vocab_size_divisible_by=64), world_size=1)
    current.set_vocab_size(257)
    with pytest.raises(CheckpointError) as err:
        _check_compatible(saved, current, "ckpt/global_step5")
    message = str(err.value)
    assert "hidden_size: checkpoint 16, config 32" in message
    assert "padded_vocab_size (derived): checkpoint 384, config 320" in message
    same = NeoXArgs.from_dict(dict(CONFIG), world_size=1)
    same.set_vocab_size(257)
    _check_compatible(saved, same, "ckpt/global_step5")  # no error


def test_resume_with_another_optimizer_layout_names_the_keys_and_finetune():
    from megatron.checkpointing.resume import _check_optimizer_layout

    bf16_zero1 = dict(CONFIG, bf16={"enabled": True}, zero_optimization={"stage": 1})
    saved = NeoXArgs.from_dict(dict(bf16_zero1, data_types={"grad_accum_dtype": "fp32"}), world_size=1)
    for other in (bf16_zero1, dict(CONFIG, zero_optimization={"stage": 1}),
                  dict(bf16_zero1, zero_optimization={"stage": 3}, data_types={"grad_accum_dtype": "fp32"})):
        with pytest.raises(CheckpointError) as err:
            _check_optimizer_layout(saved, NeoXArgs.from_dict(other, world_size=1), "ckpt/global_step5")
        message = str(err.value)
        assert "BF16_Optimizer" in message and "data_types.grad_accum_dtype" in message
        assert "finetune: true" in message
    same = NeoXArgs.from_dict(dict(bf16_zero1, data_types={"grad_accum_dtype": "fp32"}), world_size=1)
    _check_optimizer_layout(saved, same, "ckpt/global_step5")  # no error
    zero1 = NeoXArgs.from_dict(dict(CONFIG, zero_optimization={"stage": 1}), world_size=1)
    zero2 = NeoXArgs.from_dict(dict(CONFIG, zero_optimization={"stage": 2}), world_size=1)
    _check_optimizer_layout(zero1, zero2, "ckpt/global_step5")  # one DeepSpeed optimizer class


def test_resume_across_offload_optimizer_is_refused_by_our_check():
    """bf16 + fp32 gradient sums at ZeRO 1: DeepSpeed builds BF16_Optimizer on the device but
    DeepSpeedZeroOptimizer when the optimizer is offloaded to the CPU; the resume stops before DeepSpeed
    reads the files (which it would report as "may be corrupted")."""
    from megatron.checkpointing.resume import _check_optimizer_layout

    on_device = dict(CONFIG, bf16={"enabled": True}, zero_optimization={"stage": 1},
                     data_types={"grad_accum_dtype": "fp32"})
    offloaded = dict(on_device, zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}})
    for saved, current in ((on_device, offloaded), (offloaded, on_device)):
        with pytest.raises(CheckpointError) as err:
            _check_optimizer_layout(NeoXArgs.from_dict(saved, world_size=1),
                                    NeoXArgs.from_dict(current, world_size=1), "ckpt/global_step5")
        message = str(err.value)
        assert "BF16_Optimizer" in message and "DeepSpeedZeroOptimizer" in message
        assert "optimizer offloaded to the CPU" in message and "zero_optimization.offload_optimizer" in message
        assert "finetune: true" in message
