"""`--neox_args <base64>`: deepy.py encodes the resolved config, each worker decodes it."""

import pytest

from megatron.launcher import decode_neox_args, encode_neox_args, parse_worker_args
from megatron.neox_args import ConfigError, NeoXArgs

BUNDLED = "data/bundled/pystdlib_text_document"


@pytest.fixture(scope="module")
def args():
    return NeoXArgs.from_dict({"num_gpus": 2, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
                               "hidden_size": 96, "num_attention_heads": 3, "data_path": BUNDLED,
                               "lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "betas": [0.9, 0.99], "log_dir": "runs/x y"})


def test_round_trip_is_exact(args):
    encoded = encode_neox_args(args)
    assert all(char.isalnum() or char in "-_=" for char in encoded)  # one shell-safe token
    decoded = decode_neox_args(encoded)
    assert decoded == args
    assert decoded.derived.train_batch_size == 12 and decoded.logging.log_dir == "runs/x y"


@pytest.mark.parametrize("local_rank", [["--local_rank=1"], ["--local_rank", "1"], []])
def test_parse_worker_args_tolerates_local_rank(args, local_rank):
    argv = local_rank + ["--neox_args", encode_neox_args(args)]
    assert parse_worker_args(argv).model.hidden_size == 96


def test_bad_payload_is_a_config_error():
    with pytest.raises(ConfigError, match="not base64"):
        parse_worker_args(["--neox_args", "%%%"])
    with pytest.raises(SystemExit):
        parse_worker_args([])


def test_workers_read_the_config_file_deepy_writes(args, tmp_path):
    """The resolved config travels as a file in the run directory (today: a 3.7 KB base64 argument that
    DeepSpeed's launcher prints whole when a worker fails)."""
    from megatron.launcher.run_dir import write_resolved_json

    path = write_resolved_json(str(tmp_path), args)
    assert path == str(tmp_path / "neox_args.json")
    assert parse_worker_args(["--local_rank=0", "--neox_args_file", path]) == args
    with pytest.raises(ConfigError, match="cannot read the resolved config"):
        parse_worker_args(["--neox_args_file", str(tmp_path / "missing.json")])
