"""tools/ckpts/reshard.py on synthetic checkpoints: TP=2 -> 4 -> 1 keeps every weight, writes DeepSpeed's
model-states dict, the updated config, the weights_only and complete markers and `latest`; user errors end
with a message (SystemExit), never a traceback."""

import importlib.util
import os

import pytest
import torch

from megatron.checkpointing import read_model_state
from megatron.checkpointing.layout import write_latest
from megatron.checkpointing.reshard import WEIGHTS_ONLY_MARKER, split_tp
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.neox_args import NeoXArgs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CONFIG = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 8, "num_kv_heads": 4, "seq_length": 16,
          "norm": "rmsnorm", "activation": "swiglu", "intermediate_size": 192, "pos_emb": "rotary",
          "lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "make_vocab_size_divisible_by": 64,
          "data_path": "data/bundled/pystdlib_text_document", "train_micro_batch_size_per_gpu": 2,
          "train_iters": 1, "model_parallel_size": 2}


def _tool():
    spec = importlib.util.spec_from_file_location("reshard_tool", os.path.join(ROOT, "tools", "ckpts", "reshard.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_tp2_checkpoint(save):
    args = NeoXArgs.from_dict(CONFIG, world_size=2)
    args.set_vocab_size(257)  # padded to 384 (a multiple of 64 x 2)
    torch.manual_seed(0)
    full = GPTModel(args.model, args.derived, ParallelState.single()).state_dict()
    tag_dir = os.path.join(save, "global_step3")
    os.makedirs(tag_dir)
    for rank, shard in enumerate(split_tp(full, args.model, args.derived, 2)):
        torch.save({"module": shard}, os.path.join(tag_dir, f"mp_rank_{rank:02d}_model_states.pt"))
    with open(os.path.join(tag_dir, "neox_args.json"), "w") as handle:
        handle.write(args.serialize())
    with open(os.path.join(tag_dir, "complete"), "w") as handle:
        handle.write("3\n")
    write_latest(save, "global_step3")
    return full


def test_tp2_to_tp4_to_tp1_keeps_the_weights(tmp_path, capsys):
    tool = _tool()
    full = _write_tp2_checkpoint(str(tmp_path / "tp2"))
    tool.main(["--load", str(tmp_path / "tp2"), "--output", str(tmp_path / "tp4"), "--model-parallel-size", "4"])
    assert "make_vocab_size_divisible_by: 32" in capsys.readouterr().out
    tag_dir = tmp_path / "tp4" / "global_step3"
    assert sorted(os.listdir(tag_dir)) == ["complete", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
                                           "mp_rank_02_model_states.pt", "mp_rank_03_model_states.pt",
                                           "neox_args.json", WEIGHTS_ONLY_MARKER]
    states = torch.load(tag_dir / "mp_rank_03_model_states.pt", weights_only=False)
    assert states["mp_world_size"] == 4 and states["dp_world_size"] == 1 and states["global_steps"] == 3
    assert states["checkpoint_parallel_dimensions"] == {"pp_degree": 1, "tp_degree": 4}
    assert states["module"]["layers.0.mlp.linear_gate.weight"].shape == (16, 32)
    _, args4 = read_model_state(str(tmp_path / "tp4"))
    assert args4.parallel.model_parallel_size == 4 and args4.derived.padded_vocab_size == 384
    assert args4.derived.world_size == 4 and args4.derived.data_parallel_size == 1

    tool.main(["--load", str(tmp_path / "tp4"), "--output", str(tmp_path / "tp1"), "--model-parallel-size", "1"])
    state, args1 = read_model_state(str(tmp_path / "tp1"))
    assert args1.parallel.model_parallel_size == 1 and args1.model.make_vocab_size_divisible_by == 128
    assert list(state) == list(full) and all(torch.equal(state[k], full[k]) for k in full)
    assert (tmp_path / "tp1" / "latest").read_text() == "global_step3"


def test_user_errors_are_messages(tmp_path):
    tool = _tool()
    save = str(tmp_path / "tp2")
    _write_tp2_checkpoint(save)

    def fails(*argv, match):
        with pytest.raises(SystemExit, match=match):
            tool.main(["--output", str(tmp_path / "out"), *argv])

    fails("--load", str(tmp_path / "missing"), "--model-parallel-size", "1", match="is not a directory")
    fails("--load", save, "--tag", "global_step9", "--model-parallel-size", "1",
          match=r"global_step9 does not exist; complete checkpoints in .*global_step3")
    fails("--load", save, "--model-parallel-size", "8", match="does not divide num_kv_heads 4: ")
    fails("--load", save, "--model-parallel-size", "5",
          match="num_attention_heads 8, num_kv_heads 4, intermediate_size 64, padded_vocab_size 384")
    tool.main(["--load", save, "--output", str(tmp_path / "out"), "--model-parallel-size", "1"])
    fails("--load", save, "--model-parallel-size", "1", match="exists already")

    # ZeRO-3: weights in partitions only, no mp_rank file -> the consolidation instructions
    tag_dir = os.path.join(save, "global_step3")
    for rank in range(2):
        os.rename(os.path.join(tag_dir, f"mp_rank_{rank:02d}_model_states.pt"),
                  os.path.join(tag_dir, f"zero_pp_rank_0_mp_rank_{rank:02d}_model_states.pt"))
    fails("--load", save, "--model-parallel-size", "1", match="ZeRO stage 3 checkpoint.*zero_to_fp32.py")
