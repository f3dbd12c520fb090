"""NeoXArgs as a whole: serialize round trip, to_dict, deepspeed_config, error formatting."""

import json

import pytest

from megatron.neox_args import SECTIONS, ConfigError, NeoXArgs, format_error

RICH = {
    "data_path": "data/bundled/pystdlib_text_document", "tokenizer_type": "ByteLevelTokenizer",
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "model_parallel_size": 2,
    "num_layers": 3, "hidden_size": 96, "num_attention_heads": 6, "num_kv_heads": 2, "activation": "swiglu",
    "norm": "rmsnorm", "optimizer": {"type": "Adam", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
    "min_lr": 3e-5, "warmup": 0.01, "bf16": {"enabled": True},
    "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
    "gradient_clipping": 0.5, "sdpa_backend": "math",
}


@pytest.fixture
def rich():
    args = NeoXArgs.from_dict(RICH, world_size=4)
    args.set_vocab_size(257)
    return args


def test_serialize_round_trip_is_exact(rich):
    text = rich.serialize()
    back = NeoXArgs.from_serialized(text)
    assert back == rich
    assert back.serialize() == text
    assert back.optimizer.betas == (0.9, 0.95) and isinstance(back.optimizer.betas, tuple)
    assert back.derived.padded_vocab_size == 512 and back.derived.world_size == 4
    assert back.parallel.zero_optimization == {"stage": 1, "offload_optimizer": {"device": "cpu"}}


def test_from_serialized_skips_file_checks_and_keeps_derived(tmp_path):
    prefix = tmp_path / "c"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"c{suffix}").write_bytes(b"")
    args = NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "data_path": str(prefix), "train_micro_batch_size_per_gpu": 2}, world_size=8)
    for suffix in (".bin", ".idx"):
        (tmp_path / f"c{suffix}").unlink()
    back = NeoXArgs.from_serialized(args.serialize())  # data gone, still loads
    assert back.derived.world_size == 8 and back.derived.train_batch_size == 16


def test_from_serialized_rejects_bad_input(rich):
    with pytest.raises(ConfigError, match="not valid JSON"):
        NeoXArgs.from_serialized("{nope")
    with pytest.raises(ConfigError, match="derived"):
        NeoXArgs.from_serialized(json.dumps({"hidden_size": 8}))
    payload = json.loads(rich.serialize())
    payload["derived"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        NeoXArgs.from_serialized(json.dumps(payload))
    payload = json.loads(rich.serialize())
    payload["norm"] = "batchnorm"
    with pytest.raises(ConfigError, match="norm: 'batchnorm'"):
        NeoXArgs.from_serialized(json.dumps(payload))


def test_to_dict_is_flat_with_a_derived_block(rich):
    flat = rich.to_dict()
    assert flat["hidden_size"] == 96 and flat["optimizer_type"] == "Adam" and flat["lr"] == 3e-4
    assert flat["derived"]["data_parallel_size"] == 2 and flat["derived"]["precision"] == "bf16"
    assert "optimizer" not in flat and "model" not in flat
    n_fields = sum(len(cls.__dataclass_fields__) for cls in SECTIONS.values())
    assert len(flat) == n_fields + 1
    flat["zero_optimization"]["stage"] = 3  # a copy: the args are unchanged
    assert rich.parallel.zero_optimization["stage"] == 1
    # the flat user keys (without derived) rebuild the same args
    flat = rich.to_dict()
    del flat["derived"]
    rebuilt = NeoXArgs.from_dict(flat, world_size=4)
    rebuilt.set_vocab_size(257)
    assert rebuilt == rich


def test_deepspeed_config(rich):
    ds = rich.deepspeed_config()
    assert ds["train_batch_size"] == 16  # 4 micro x 2 acc x dp 2 (world 4 / tp 2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False
    assert ds["timers"] == {"throughput": {"enabled": False}}  # its timer synchronizes the device
    assert "optimizer" not in ds and "scheduler" not in ds
    ds["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    assert rich.parallel.zero_optimization["offload_optimizer"]["device"] == "cpu"
    json.dumps(ds)  # DeepSpeed takes it as a plain JSON-able dict


def test_input_dict_is_not_mutated_or_aliased():
    source = {"data_path": "data/bundled/x", "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
              "lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer"}
    args = NeoXArgs.from_dict(source, world_size=1)
    args.precision.bf16["enabled"] = False
    assert source["bf16"] == {"enabled": True}


def test_error_formatting_is_one_self_contained_paragraph():
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "data_path": "data/bundled/x", "train_micro_batch_size_per_gpu": 1,
                            "num_layers": "four"}, source="my.yml", world_size=1)
    assert isinstance(err.value, ValueError)
    text = format_error(err.value)
    assert text.startswith("Config error: num_layers: 'four' is not an integer (my.yml)")
    assert "\n" not in text and err.value.key == "num_layers" and err.value.sources == ("my.yml",)
    assert format_error(KeyError("x")) == "KeyError: 'x'"


def test_world_size_argument_checked():
    with pytest.raises(ConfigError, match="world_size 0"):
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "data_path": "data/bundled/x", "train_micro_batch_size_per_gpu": 1}, world_size=0)
