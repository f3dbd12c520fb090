"""tools/bench/bench_attention.py arithmetic: the causal FLOP count reproduces the issue's FA4 figure."""

import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "bench")))

from bench_attention import causal_flops  # noqa: E402


def test_causal_flops_match_the_measured_fa4_figure():
    # issue 16: FA4, head size 128, seq 128k (16 heads of the 1.3B layer, batch 1): 390 ms = 632 TFLOP/s
    assert causal_flops(1, 16, 128, 131072) / 0.390 / 1e12 == pytest.approx(632, rel=0.01)
    assert causal_flops(2, 16, 128, 4096) == 2 * causal_flops(1, 16, 128, 4096)
    assert causal_flops(1, 16, 128, 8192) == 4 * causal_flops(1, 16, 128, 4096)
