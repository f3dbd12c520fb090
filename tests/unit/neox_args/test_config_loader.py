"""YAML loading and merging: floats, key spellings, duplicates, unknown keys, the nested optimizer block."""

import pytest
import yaml

from megatron.neox_args import ConfigError, NeoXArgs
from megatron.neox_args.loader import parse_yaml

BASE_YAML = """
data_path: data/bundled/pystdlib_text_document
train_micro_batch_size_per_gpu: 2
tokenizer_type: ByteLevelTokenizer
"""


@pytest.mark.parametrize("text, expected", [
    ("1e-5", 1e-5), ("3e-4", 3e-4), ("6.0e-4", 6.0e-4), ("1E5", 1e5), ("6.0e4", 6.0e4), ("-2e-3", -2e-3),
    (".5e-3", 0.5e-3), ("0.1", 0.1), ("1_000.5", 1000.5),
])
def test_exponent_notation_is_float(text, expected):
    value = parse_yaml(f"x: {text}", "t.yml")["x"]
    assert isinstance(value, float) and value == expected


def test_ints_strings_and_plain_safe_loader_unchanged():
    data = parse_yaml("a: 12\nb: '1e-5'\nc: abc\nd: true\ne: 0x10", "t.yml")
    assert data == {"a": 12, "b": "1e-5", "c": "abc", "d": True, "e": 16}
    assert yaml.safe_load("x: 1e-5")["x"] == "1e-5"  # our resolver did not leak into yaml.SafeLoader


def test_float_from_yaml_file_reaches_field(write_yaml):
    path = write_yaml("a.yml", BASE_YAML + "optimizer: {params: {lr: 3e-4}}\nmin_lr: 1e-5\n")
    args = NeoXArgs.from_ymls([path], world_size=1)
    assert args.optimizer.lr == 3e-4 and args.lr.min_lr == 1e-5


def test_dash_and_underscore_are_one_key(write_yaml):
    path = write_yaml("a.yml", BASE_YAML + "train-iters: 7\nhidden-size: 64\nlr: 1e-3\n")
    args = NeoXArgs.from_ymls([path], world_size=1)
    assert args.training.train_iters == 7 and args.model.hidden_size == 64


def test_same_key_in_two_files_names_both(write_yaml):
    a = write_yaml("a.yml", BASE_YAML + "train_iters: 5\n")
    b = write_yaml("b.yml", "train-iters: 6\n")
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([a, b], world_size=1)
    message = str(err.value)
    assert "train_iters" in message and a in message and b in message and "train-iters" in message
    assert err.value.key == "train_iters"


def test_both_spellings_in_one_file(write_yaml):
    a = write_yaml("a.yml", BASE_YAML + "train_iters: 5\ntrain-iters: 6\n")
    with pytest.raises(ConfigError, match=r"`train_iters` is set twice.*a\.yml.*a\.yml"):
        NeoXArgs.from_ymls([a], world_size=1)


def test_exact_duplicate_in_one_file(write_yaml):
    a = write_yaml("a.yml", BASE_YAML + "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"`seed` appears twice in .*a\.yml \(line 6\)"):
        NeoXArgs.from_ymls([a], world_size=1)


def test_files_merge_left_to_right(write_yaml):
    a = write_yaml("a.yml", BASE_YAML)
    b = write_yaml("b.yml", "hidden_size: 64\nnum_attention_heads: 2\nlr: 1e-3\n")
    args = NeoXArgs.from_ymls([a, b], world_size=1)
    assert args.model.hidden_size == 64 and args.model.num_attention_heads == 2
    assert args.source_of("hidden_size") == b and args.source_of("data_path") == a
    assert args.source_of("seed") == "default"


@pytest.mark.parametrize("key, suggestion", [
    ("hiden_size", "hidden_size"), ("hiden-size", "hidden_size"), ("num-layer", "num_layers"),
    ("train_iter", "train_iters"),
])
def test_unknown_key_suggests_closest(write_yaml, key, suggestion):
    a = write_yaml("a.yml", BASE_YAML + f"{key}: 3\n")
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([a], world_size=1)
    assert f"unknown key `{key}`" in str(err.value) and a in str(err.value)
    assert f"did you mean `{suggestion}`?" in str(err.value)


def test_derived_keys_get_a_hint(minimal):
    with pytest.raises(ConfigError, match="computed from other keys"):
        NeoXArgs.from_dict({**minimal, "padded_vocab_size": 512})


def test_nested_optimizer_block(minimal):
    minimal.pop("lr")
    args = NeoXArgs.from_dict({**minimal, "optimizer": {
        "type": "SGD", "params": {"lr": 0.1, "betas": [0.8, 0.9], "eps": 1e-6, "momentum": 0.9,
                                  "weight_decay": 0.0}}}, world_size=1)
    opt = args.optimizer
    assert (opt.optimizer_type, opt.lr, opt.betas, opt.eps, opt.momentum, opt.weight_decay) == (
        "SGD", 0.1, (0.8, 0.9), 1e-6, 0.9, 0.0)
    assert isinstance(opt.betas, tuple)


def test_unknown_key_inside_optimizer_params(minimal):
    with pytest.raises(ConfigError, match=r"unknown key `beta` inside `optimizer.params`.*did you mean `betas`"):
        NeoXArgs.from_dict({**minimal, "optimizer": {"params": {"beta": [0.9, 0.95]}}})
    with pytest.raises(ConfigError, match=r"unknown key `kind` inside `optimizer`"):
        NeoXArgs.from_dict({**minimal, "optimizer": {"kind": "Adam"}})


def test_weight_decay_top_level_or_nested_not_both(minimal):
    top = NeoXArgs.from_dict({**minimal, "weight_decay": 0.1}, world_size=1)
    nested = NeoXArgs.from_dict({**minimal, "optimizer": {"params": {"weight_decay": 0.1}}}, world_size=1)
    assert top.optimizer.weight_decay == nested.optimizer.weight_decay == 0.1
    with pytest.raises(ConfigError, match=r"`weight_decay` is set twice.*optimizer\.params\.weight_decay"):
        NeoXArgs.from_dict({**minimal, "weight_decay": 0.1, "optimizer": {"params": {"weight_decay": 0.2}}})


def test_flat_lr_and_nested_lr_conflict(minimal):
    with pytest.raises(ConfigError, match=r"`lr` is set twice"):
        NeoXArgs.from_dict({**minimal, "lr": 0.1, "optimizer": {"params": {"lr": 0.2}}})


def test_missing_file_and_bad_yaml(write_yaml, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        NeoXArgs.from_ymls([str(tmp_path / "nope.yml")])
    bad = write_yaml("bad.yml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as err:
        NeoXArgs.from_ymls([bad])
    assert "\n" not in str(err.value)
    listing = write_yaml("list.yml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        NeoXArgs.from_ymls([listing])
