"""The torchtitan baseline's shape mapping (tools/bench/bench_torchtitan.py); the run itself needs a GPU and
the optional torchtitan package, so it is exercised on the GPU machine by bench_throughput --baselines torchtitan."""

from __future__ import annotations

import math
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

from bench_config import build_neox_args  # noqa: E402
from bench_data import ensure_synthetic_dataset  # noqa: E402
from bench_torchtitan import TorchtitanShapeError, ffn_dims, torchtitan_model_args  # noqa: E402


def torchtitan_width(hidden: int, multiplier: float, multiple_of: int) -> int:
    """torchtitan's FeedForward width rule, restated: int(2*4h/3), times the multiplier, rounded up."""
    width = int(multiplier * int(2 * 4 * hidden / 3))
    return multiple_of * math.ceil(width / multiple_of)


@pytest.mark.parametrize("hidden,width", [(2048, 8192), (4096, 14336), (64, 192), (3072, 8192), (128, 344)])
def test_ffn_dims_reproduce_the_exact_width(hidden, width):
    multiplier, multiple_of = ffn_dims(hidden, width)
    assert torchtitan_width(hidden, multiplier, multiple_of) == width


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("tt_data")), 1000, 4096)


def _spec(size: str, prefix: str) -> dict:
    return {"size": size, "device": "cpu", "seq": 64, "micro_batch": 2, "grad_accum": 1, "overrides": {},
            "warmup": 1, "steps": 1, "data_prefix": prefix, "cache_dir": os.path.dirname(prefix)}


def test_llama_1b_shape_maps_onto_torchtitan(data_prefix):
    args = build_neox_args(_spec("llama-1B", data_prefix))
    fields = torchtitan_model_args(args.model, args.derived)
    assert (fields["dim"], fields["n_layers"], fields["n_heads"], fields["n_kv_heads"]) == (2048, 16, 32, 8)
    assert fields["vocab_size"] == 32768 and fields["rope_theta"] == 500000 and fields["max_seq_len"] == 64
    assert torchtitan_width(2048, fields["ffn_dim_multiplier"], fields["multiple_of"]) == 8192


def test_gpt_neox_shape_is_refused_with_the_reasons(data_prefix):
    args = build_neox_args(_spec("410M", data_prefix))
    with pytest.raises(TorchtitanShapeError, match="RMSNorm.*SwiGLU"):
        torchtitan_model_args(args.model, args.derived)
