"""Type checking of values by field annotation."""

import pytest

from megatron.neox_args import ConfigError, NeoXArgs
from megatron.neox_args.coerce import coerce_value
from typing import Literal, Optional


def test_literal_error_lists_choices_file_and_suggestion(write_yaml):
    path = write_yaml("x.yml", "data_path: data/bundled/a\ntrain_micro_batch_size_per_gpu: 1\nnorm: layer_norm\n")
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([path], world_size=1)
    assert str(err.value).startswith(f"norm: 'layer_norm' is not one of 'layernorm', 'rmsnorm' ({path})")
    assert "Did you mean 'layernorm'?" in str(err.value)


@pytest.mark.parametrize("key, value, phrase", [
    ("num_layers", True, "is not an integer"),        # bool is not an int
    ("num_layers", 2.5, "is not an integer"),
    ("num_layers", "4", "is not an integer"),
    ("warmup", "abc", "is not a number"),             # strict: a string is never a float
    ("warmup", False, "is not a number"),
    ("gpt_j_residual", 1, "is not true or false"),
    ("gpt_j_residual", "yes", "is not true or false"),
    ("split", 969, "is not a string"),
    ("betas", 0.9, "is not a list"),
    ("zero_optimization", 1, "is not a mapping"),
    ("train_data_paths", "a", "is not a list or null"),
    ("num_layers", None, "null is not allowed"),
    ("sdpa_backend", "fast", "is not one of 'flash', 'cudnn', 'efficient', 'math' or null"),
])
def test_wrong_types_are_errors(minimal, key, value, phrase):
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_dict({**minimal, key: value}, source="cfg.yml", world_size=1)
    message = str(err.value)
    assert phrase in message and key in message and "cfg.yml" in message


def test_quoted_number_error_says_what_to_write(minimal):
    with pytest.raises(ConfigError, match=r"warmup: '0\.1' is not a number .*write a number \(e\.g\. 3\.0e-4\)"
                                          r".*Do not quote numbers"):
        NeoXArgs.from_dict({**minimal, "warmup": "0.1"})


def test_accepted_conversions(minimal):
    args = NeoXArgs.from_dict({**minimal, "warmup": 0, "train_iters": 1e3, "betas": [0.9, 0.99],
                               "init_method_std": 1}, world_size=1)
    assert args.lr.warmup == 0.0 and isinstance(args.lr.warmup, float)
    assert args.training.train_iters == 1000 and isinstance(args.training.train_iters, int)
    assert args.optimizer.betas == (0.9, 0.99)
    assert isinstance(args.model.init_method_std, float)


def test_coerce_value_directly():
    assert coerce_value("k", None, Optional[int], "s") is None
    assert coerce_value("k", 3, Optional[int], "s") == 3
    assert coerce_value("k", "a", Literal["a", "b"], "s") == "a"
    assert coerce_value("k", (1, 2), list, "s") == [1, 2]
    with pytest.raises(ConfigError):
        coerce_value("k", True, float, "s")


def test_messages_use_the_spelling_the_user_wrote(minimal):
    with pytest.raises(ConfigError, match=r"^optimizer\.type: 'Adamm' is not one of 'Adam', 'AdamW', 'SGD'.*"
                                          r"Did you mean 'Adam'") as err:
        NeoXArgs.from_dict({**minimal, "optimizer": {"type": "Adamm"}})
    assert err.value.key == "optimizer_type"
    with pytest.raises(ConfigError, match=r"^train-iters: 'many' is not an integer") as err:
        NeoXArgs.from_dict({**minimal, "train-iters": "many"})
    assert err.value.key == "train_iters"
