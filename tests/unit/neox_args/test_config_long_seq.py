"""The long-sequence keys: bad values are ConfigErrors naming key, value and the fix; good ones validate;
a missing FlashAttention-4 package is a ConfigError naming the pip package (at model build)."""

import pytest

from megatron.neox_args import ConfigError, NeoXArgs

from conftest import MINIMAL

BF16 = {"bf16": {"enabled": True}}

BAD = [
    ({"attention_impl": "fa4", "hidden_size": 120, "num_attention_heads": 4, **BF16},
     ["attention_impl: fa4 cannot take head size 30", "multiple of 8"]),
    ({"attention_impl": "fa4", "hidden_size": 1024, "num_attention_heads": 2, **BF16},
     ["head size 512", "up to 128"]),
    ({"attention_impl": "fa4"}, ["bf16 or fp16 only", "fp32"]),
    ({"attention_impl": "fa4", "attention_dropout": 0.1, **BF16}, ["no attention dropout", "attention_dropout: 0.0"]),
    ({"reset_attention_mask": True, "attention_dropout": 0.1}, ["variable-length attention has no dropout"]),
    ({"sliding_window_width": 0}, ["sliding_window_width: 0", "positive"]),
    ({"mlp_chunk_size": 0}, ["mlp_chunk_size: 0", "positive"]),
    ({"checkpoint_in_cpu": True}, ["checkpoint_in_cpu: true", "checkpoint_activations: true"]),
    ({"reset_attention_mask": True, "pipe_parallel_size": 2}, ["reset_attention_mask with pipe_parallel_size: 2",
                                                               "pipe_parallel_size: 1"]),
    ({"checkpoint_activations": True, "checkpoint_in_cpu": True, "pipe_parallel_size": 2},
     ["checkpoint_in_cpu with pipe_parallel_size: 2"]),
    ({"checkpoint_keep_attention": True}, ["checkpoint_keep_attention: true with checkpoint_activations: false",
                                           "set checkpoint_activations: true"]),
    ({"checkpoint_keep_attention": True, "checkpoint_activations": True, "checkpoint_num_layers": 2},
     ["checkpoint_keep_attention: true with checkpoint_num_layers: 2", "set checkpoint_num_layers: 1"]),
    ({"checkpoint_keep_attention": True, "checkpoint_activations": True, "checkpoint_in_cpu": True},
     ["checkpoint_keep_attention: true with checkpoint_in_cpu: true", "choose one"]),
    ({"checkpoint_keep_attention": True, "checkpoint_activations": True, "pipe_parallel_size": 2},
     ["checkpoint_keep_attention: true with pipe_parallel_size: 2", "set pipe_parallel_size: 1"]),
    ({"reset_attention_mask": True, "seq_length": 2**30, "train_micro_batch_size_per_gpu": 2},
     ["int32", "2147483648 tokens"]),
]


@pytest.mark.parametrize("overrides, phrases", BAD)
def test_bad_long_seq_settings_are_config_errors(overrides, phrases):
    with pytest.raises(ConfigError) as info:
        NeoXArgs.from_dict({**MINIMAL, **overrides}, source="run.yml")
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    assert "run.yml" in message


def test_good_long_seq_settings_validate():
    args = NeoXArgs.from_dict({**MINIMAL, **BF16, "attention_impl": "fa4", "hidden_size": 256, "num_attention_heads": 2,
                               "sliding_window_width": 64, "mlp_chunk_size": 8192, "reset_attention_mask": True,
                               "reset_position_ids": True, "eod_mask_loss": True, "checkpoint_activations": True,
                               "checkpoint_in_cpu": True})
    assert args.model.attention_impl == "fa4" and args.model.sliding_window_width == 64
    assert (args.data.reset_attention_mask, args.data.reset_position_ids, args.data.eod_mask_loss) == (True,) * 3
    assert args.training.checkpoint_in_cpu and args.model.mlp_chunk_size == 8192


def test_fa4_missing_names_the_pip_package(monkeypatch):
    from megatron.model import attention_support
    from megatron.model.attention import ParallelSelfAttention
    from megatron.mpu.initialize import ParallelState
    from megatron.neox_args.sections import DerivedArgs, ModelArgs

    monkeypatch.setattr(attention_support, "import_fa4", lambda: None)
    model = ModelArgs(attention_impl="fa4")
    with pytest.raises(ConfigError, match="pip install flash-attn-4") as info:
        ParallelSelfAttention(model, DerivedArgs(num_kv_heads=4), ParallelState.single())
    assert info.value.key == "attention_impl"


def test_fa4_on_a_machine_without_cuda_is_a_config_error(monkeypatch):
    from megatron.model import attention_support
    from megatron.neox_args.sections import ModelArgs

    monkeypatch.setattr(attention_support, "import_fa4", lambda: object())  # pretend it is installed
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        attention_support.check_attention_support(ModelArgs(attention_impl="fa4"), device_type="cpu")
    attention_support.check_attention_support(ModelArgs(attention_impl="fa4"), device_type="cuda")


def test_recompute_modules_names_and_exclusivity():
    args = NeoXArgs.from_dict({**MINIMAL, "recompute_modules": ["core_attn", "mlp_act"]})
    assert args.training.recompute_modules == ["core_attn", "mlp_act"]
    with pytest.raises(ConfigError, match=r"unknown name\(s\) \['mlp'\]"):
        NeoXArgs.from_dict({**MINIMAL, "recompute_modules": ["mlp"]})
    with pytest.raises(ConfigError, match="full checkpointing recomputes every layer already"):
        NeoXArgs.from_dict({**MINIMAL, "recompute_modules": ["core_attn"], "checkpoint_activations": True})
    with pytest.raises(ConfigError, match="compiled layers recompute the MLP activation already"):
        NeoXArgs.from_dict({**MINIMAL, "recompute_modules": ["mlp_act"], "torch_compile": True})


def test_a_window_with_an_old_flash_attn_is_a_config_error(monkeypatch):
    from types import SimpleNamespace

    from megatron.model import attention_support
    from megatron.neox_args.sections import ModelArgs

    monkeypatch.setattr(attention_support, "import_flash_attn", lambda: SimpleNamespace(__version__="2.2.1"))
    with pytest.raises(ConfigError, match="flash-attn >= 2.3"):
        attention_support.check_attention_support(ModelArgs(attention_impl="flash", sliding_window_width=64), "cuda")
    monkeypatch.setattr(attention_support, "import_flash_attn", lambda: SimpleNamespace(__version__="2.7.4.post1"))
    attention_support.check_attention_support(ModelArgs(attention_impl="flash", sliding_window_width=64), "cuda")
