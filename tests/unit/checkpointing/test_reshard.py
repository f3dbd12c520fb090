"""Tensor-parallel resharding of state dicts (megatron/checkpointing/reshard.py): split then merge is the
identity (bitwise), the shards have the shapes a TP=n model holds, unknown keys and sizes that do not
divide raise, and the resharded config keeps the padded vocabulary."""

import pytest
import torch

from megatron.checkpointing.reshard import (
    merge_tp_shards,
    resharded_args,
    split_dim,
    split_tp,
    vocab_divisor_for,
)
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.neox_args import NeoXArgs
from megatron.neox_args.derive import pad_vocab_size
from tests.unit.model.model_test_utils import make_args

CONFIGS = {
    "neox-parallel-residual-untied": dict(gpt_j_residual=True, no_weight_tying=True, rotary_pct=0.25),
    "llama-gqa-swiglu-tied-rmsnorm": dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm",
                                          use_bias_in_mlp=False),
    "learned-pos-tied": dict(pos_emb="learned"),
}


def full_state(model, derived):
    torch.manual_seed(0)
    return GPTModel(model, derived, ParallelState.single()).state_dict()


@pytest.mark.parametrize("name", CONFIGS)
def test_split_then_merge_is_identity(name):
    model, derived = make_args(**CONFIGS[name])
    full = full_state(model, derived)
    sizes = (1, 2) if derived.num_kv_heads == 2 else (1, 2, 4)
    for tp in sizes:
        shards = split_tp(full, model, derived, tp)
        assert len(shards) == tp and all(list(s) == list(full) for s in shards)
        for key, tensor in full.items():
            dim = split_dim(key)
            expected = tensor.shape if dim is None else tensor.shape[:dim] + (tensor.shape[dim] // tp,) + \
                tensor.shape[dim + 1:]
            assert all(s[key].shape == expected for s in shards), key
        merged = merge_tp_shards(shards, model, derived)
        assert list(merged) == list(full)
        for key in full:
            assert torch.equal(merged[key], full[key]), key


def test_gqa_kv_heads_must_divide_tp():
    model, derived = make_args(**CONFIGS["llama-gqa-swiglu-tied-rmsnorm"])  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="does not divide num_kv_heads 2"):
        split_tp(full_state(model, derived), model, derived, 4)


def test_sizes_that_do_not_divide_are_named():
    model, derived = make_args(num_attention_heads=4, intermediate_size=60)
    derived.padded_vocab_size = 60
    with pytest.raises(ValueError) as err:
        split_tp({}, model, derived, 8)
    message = str(err.value)
    for part in ("num_attention_heads 4", "num_kv_heads 4", "intermediate_size 60", "padded_vocab_size 60",
                 "make_vocab_size_divisible_by"):
        assert part in message, message


def test_unknown_key_raises():
    model, derived = make_args()
    full = full_state(model, derived)
    full["layers.0.attention.some_new_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(KeyError, match="some_new_proj"):
        split_tp(full, model, derived, 2)
    with pytest.raises(KeyError, match="some_new_proj"):
        merge_tp_shards([full, full], model, derived)


def test_merge_refuses_diverged_replicated_tensors():
    model, derived = make_args()
    shards = split_tp(full_state(model, derived), model, derived, 2)
    shards[1] = dict(shards[1], **{"final_norm.weight": shards[1]["final_norm.weight"] + 1})
    with pytest.raises(ValueError, match="final_norm.weight is replicated"):
        merge_tp_shards(shards, model, derived)


def test_vocab_divisor_keeps_the_padded_size():
    # 257 tokens, divisor 64 at tp 2 -> 384 rows; at tp 1 that needs divisor 128, at tp 4 divisor 32
    assert pad_vocab_size(257, 64, 2) == 384
    assert vocab_divisor_for(257, 384, 64, 2, 1) == 128
    assert vocab_divisor_for(257, 384, 64, 2, 4) == 32
    # 64 x 2 / 3 is no integer: the smallest divisor of 384 / 3 that pads 257 to 384
    assert vocab_divisor_for(257, 384, 64, 2, 3) == 64 and pad_vocab_size(257, 64, 3) == 384
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by 64"):
        vocab_divisor_for(257, 384, 64, 2, 5)


def test_resharded_args_validate_against_a_config_at_the_new_size():
    base = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
            "data_path": "data/bundled/pystdlib_text_document", "train_micro_batch_size_per_gpu": 2,
            "lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_iters": 1, "make_vocab_size_divisible_by": 64, "sequence_parallel": True}
    saved = NeoXArgs.from_dict(dict(base, model_parallel_size=2), world_size=4)
    saved.set_vocab_size(257)
    new = resharded_args(saved, 1)
    assert new.parallel.model_parallel_size == 1 and not new.parallel.sequence_parallel
    assert new.derived.padded_vocab_size == 384 and new.derived.data_parallel_size == 2
    assert new.derived.world_size == 2 and new.derived.train_batch_size == saved.derived.train_batch_size
    # a config at model_parallel_size 1 with the recorded divisor pads the vocabulary the same way
    config = NeoXArgs.from_dict(dict(base, sequence_parallel=False,
                                     make_vocab_size_divisible_by=new.model.make_vocab_size_divisible_by),
                                world_size=1)
    config.set_vocab_size(257)
    assert config.derived.padded_vocab_size == new.derived.padded_vocab_size
    assert saved.parallel.model_parallel_size == 2  # the input is not modified
