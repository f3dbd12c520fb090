"""Derived values: batch arithmetic, resolved model shape, precision, schedule lengths, padded vocab."""

import dataclasses

import pytest

from megatron.neox_args import ConfigError, NeoXArgs

DATA = {"data_path": "data/bundled/pystdlib_text_document", "tokenizer_type": "ByteLevelTokenizer", "lr": 6.0e-4}


@pytest.mark.parametrize("batch, world_size, tp, expected", [
    # given keys -> (train_batch_size, micro, grad_acc), with dp = world_size / tp
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, 1, (24, 4, 3)),
    ({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 32}, 4, 1, (32, 4, 2)),
    ({"gradient_accumulation_steps": 2, "train_batch_size": 32}, 4, 1, (32, 4, 2)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16}, 4, 2,
     (16, 4, 2)),
    ({"train_micro_batch_size_per_gpu": 4}, 2, 1, (8, 4, 1)),
    ({"train_batch_size": 12}, 3, 1, (12, 4, 1)),
])
def test_batch_arithmetic(batch, world_size, tp, expected):
    args = NeoXArgs.from_dict({**DATA, **batch, "model_parallel_size": tp}, world_size=world_size)
    d = args.derived
    assert (d.train_batch_size, d.train_micro_batch_size_per_gpu, d.gradient_accumulation_steps) == expected
    assert d.data_parallel_size == world_size // tp
    assert d.train_batch_size == d.train_micro_batch_size_per_gpu * d.gradient_accumulation_steps * d.data_parallel_size


@pytest.mark.parametrize("batch, world_size, phrase", [
    ({}, 1, "no batch size is set"),
    ({"gradient_accumulation_steps": 2}, 1, "no batch size is set"),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 10}, 1,
     "4 x 2 x 1 = 8, but it is 10"),
    ({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 10}, 2, "not a multiple of"),
    ({"gradient_accumulation_steps": 3, "train_batch_size": 10}, 1, "not a multiple of"),
])
def test_batch_errors(batch, world_size, phrase):
    with pytest.raises(ConfigError, match=phrase):
        NeoXArgs.from_dict({**DATA, **batch}, world_size=world_size)


def _args(**overrides):
    return NeoXArgs.from_dict({**DATA, "train_micro_batch_size_per_gpu": 1, **overrides}, world_size=1)


@pytest.mark.parametrize("overrides, expected", [
    ({"hidden_size": 128, "activation": "gelu"}, 512),
    ({"hidden_size": 128, "activation": "relu"}, 512),
    ({"hidden_size": 128, "activation": "gelu", "intermediate_size": 1000, "mlp_multiple_of": 256}, 1024),
    # GPT-NeoX's gated rule: 4h (or intermediate_size) counts 3x the width, rounded up to mlp_multiple_of
    ({"hidden_size": 2048, "num_attention_heads": 16, "activation": "swiglu", "mlp_multiple_of": 256}, 2816),
    ({"hidden_size": 4096, "num_attention_heads": 32, "activation": "swiglu", "intermediate_size": 32768,
      "mlp_multiple_of": 256}, 11008),  # Llama-2 7B as upstream's configs/llama2/7B.yml writes it
    ({"hidden_size": 128, "activation": "swiglu", "intermediate_size": 900}, 300),
])
def test_intermediate_size(overrides, expected):
    assert _args(**overrides).derived.intermediate_size == expected


def test_gated_width_whose_roundings_disagree_is_refused():
    # upstream: fc1 rounded to 5462 (2 x 2731) but fc2 takes 2730, and its model fails; here a clear error
    with pytest.raises(ConfigError, match="first projection of 5462 but a width of 2730"):
        _args(hidden_size=2048, num_attention_heads=16, activation="swiglu")


def test_resolved_model_and_schedule_values():
    d = _args(num_attention_heads=8, hidden_size=128, seq_length=64, train_iters=1000, warmup=0.1).derived
    assert (d.num_kv_heads, d.max_position_embeddings, d.lr_decay_iters, d.warmup_iters) == (8, 64, 1000, 100)
    d = _args(num_kv_heads=2, max_position_embeddings=512, lr_decay_iters=300, warmup=0.5).derived
    assert (d.num_kv_heads, d.max_position_embeddings, d.lr_decay_iters, d.warmup_iters) == (2, 512, 300, 150)


@pytest.mark.parametrize("overrides, precision", [
    ({}, "fp32"), ({"bf16": {"enabled": True}}, "bf16"), ({"fp16": {"enabled": True, "loss_scale": 0}}, "fp16"),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "fp32"),
])
def test_precision(overrides, precision):
    assert _args(**overrides).derived.precision == precision


@pytest.mark.parametrize("vocab, divisible_by, tp, padded", [
    (257, 128, 1, 384), (256, 128, 1, 256), (50277, 128, 2, 50432), (50277, 128, 1, 50304), (1, 8, 4, 32),
])
def test_set_vocab_size_pads(vocab, divisible_by, tp, padded):
    args = NeoXArgs.from_dict({**DATA, "train_micro_batch_size_per_gpu": 1, "model_parallel_size": tp,
                               "make_vocab_size_divisible_by": divisible_by}, world_size=tp)
    assert (args.derived.vocab_size, args.derived.padded_vocab_size) == (0, 0)
    args.set_vocab_size(vocab)
    assert (args.derived.vocab_size, args.derived.padded_vocab_size) == (vocab, padded)
    assert padded % (divisible_by * tp) == 0 and padded >= vocab
    with pytest.raises(ConfigError):
        args.set_vocab_size(0)


def test_derived_values_never_enter_user_sections():
    args = _args(num_kv_heads=None, intermediate_size=None)
    args.set_vocab_size(300)
    assert args.model.num_kv_heads is None and args.model.intermediate_size is None
    assert args.model.max_position_embeddings is None and args.lr.lr_decay_iters is None
    assert args.training.train_batch_size is None and args.training.gradient_accumulation_steps is None
    user_fields = {f.name for name, section in args.section_items() for f in dataclasses.fields(section)}
    assert "padded_vocab_size" not in user_fields and "data_parallel_size" not in user_fields
    flat = args.to_dict()
    assert flat["num_kv_heads"] is None and flat["derived"]["num_kv_heads"] == 4
    assert flat["derived"]["padded_vocab_size"] == 384 and "padded_vocab_size" not in flat


BF16_SUMS = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("overrides, world_size, expected", [
    # unset: on exactly where BF16_Optimizer fills its sums itself at one micro-batch per step, no pipeline
    ({}, 1, True),
    ({"gradient_accumulation_steps": 2}, 1, False),  # the sums live through the later forwards anyway
    ({"bf16": {"enabled": True, "immediate_grad_update": True}}, 1, False),  # DeepSpeed's hooks need them
    ({"data_types": {}}, 1, False),  # bf16 sums: DeepSpeed's ZeRO optimizer, not BF16_Optimizer
    ({"zero_optimization": {"stage": 2}}, 1, False),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, 1, False),
    ({"pipe_parallel_size": 2}, 2, False),
    # a value the user wrote is kept
    ({"free_grad_sums_between_steps": False}, 1, False),
    ({"free_grad_sums_between_steps": True, "gradient_accumulation_steps": 2}, 1, True),
])
def test_free_grad_sums_resolution(overrides, world_size, expected):
    args = NeoXArgs.from_dict({**DATA, "train_micro_batch_size_per_gpu": 2, **BF16_SUMS, **overrides},
                              world_size=world_size)
    assert args.derived.free_grad_sums is expected
    assert args.precision.free_grad_sums_between_steps == overrides.get("free_grad_sums_between_steps")


def test_free_grad_sums_stay_off_without_bf16():
    assert not NeoXArgs.from_dict({**DATA, "train_micro_batch_size_per_gpu": 2}, world_size=1).derived.free_grad_sums
