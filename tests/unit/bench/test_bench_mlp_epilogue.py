"""tools/bench/bench_mlp_epilogue.py on the CPU: the unfused side's activation gradients are autograd's, the
gate/up interleaving it hands quack is one layout for the weight and the preact, the MLP facts come from the
size file, and asking for the fused side where it cannot run is a clear error. (The fused side itself runs on
a CUDA machine with quack installed, where the bench compares its outputs with these before timing.)"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "bench")))

import bench_mlp_epilogue as bench  # noqa: E402


@pytest.mark.parametrize("activation", ["gelu_erf", "gelu_tanh_approx", "swiglu"])
def test_activation_gradient_is_autograds(activation):
    torch.manual_seed(0)
    p = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(5, 6 if activation == "swiglu" else 12, dtype=torch.float64)
    (expected,) = torch.autograd.grad(bench.act_forward(p, activation), p, dz)
    torch.testing.assert_close(bench.act_backward(dz, p.detach(), activation), expected, rtol=1e-12, atol=1e-12)


def test_the_models_gelu_is_the_one_timed():
    """exact GELU for the shipped 410M (as Pythia), the tanh one where bias_gelu_fusion asks for it."""
    args = bench.bench_args("410M", 64, 1, "cpu")
    assert bench.quack_activation(args.model) == "gelu_erf"
    args.model.bias_gelu_fusion = True
    assert bench.quack_activation(args.model) == "gelu_tanh_approx"
    erf, tanh = (bench.act_forward(torch.tensor([1.0]), a) for a in ("gelu_erf", "gelu_tanh_approx"))
    assert erf.item() != tanh.item()


def test_interleaved_weight_gives_the_interleaved_preact():
    """X @ interleave(W [gate; up] rows).T == interleave(X @ [gate; up].T columns): quack's preact pairs
    each gate column with its up column, as the bench's reference does."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(2 * 5, 3, dtype=torch.float64)
    p = x @ w.t()  # [T, gate | up]
    torch.testing.assert_close(x @ bench.interleave_halves(w, 0).t(), bench.interleave_halves(p, -1))
    paired = bench.interleave_halves(p, -1)
    torch.testing.assert_close(paired[:, 0::2], p[:, :5])  # gate at even columns (quack's preact[..., ::2])
    torch.testing.assert_close(paired[:, 1::2], p[:, 5:])


@pytest.mark.parametrize("size, gated, bias, width", [("410M", False, True, 4096), ("llama-1B", True, False, 8192)])
def test_mlp_shape_from_the_size_file(size, gated, bias, width):
    shape = bench.mlp_shape(bench.bench_args(size, 64, 1, "cpu"))
    assert (shape["gated"], shape["bias"], shape["width"]) == (gated, bias, width)
    assert shape["activation"] == ("swiglu" if gated else "gelu_erf")


def test_cpu_report_is_the_unfused_side_and_fused_is_refused():
    shape = bench.mlp_shape(bench.bench_args("tiny", 32, 1, "cpu"))
    report = bench.layer_report(shape, 32, warmup=0, iters=1, device=torch.device("cpu"))
    unfused = report["unfused"]
    assert unfused["forward_ms"] == pytest.approx(unfused["forward_gemm_ms"] + unfused["forward_act_ms"])
    assert "fused" not in report and all(v > 0 for v in unfused.values())
    with pytest.raises(SystemExit, match="CUDA only"):
        bench.main(["--sizes", "tiny", "--seq", "32", "--micro-batch", "1", "--device", "cpu", "--fused"])


def test_host_cost_is_per_call_and_counts_every_call():
    """host_us divides the issuing time by the calls it made (a function that sleeps 2 ms a call reads ~2000 us),
    and the CPU host report times the cuBLAS side only."""
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.002)

    us = bench.host_us(slow, 5, torch.device("cpu"))
    assert len(calls) == 15 and 2000 <= us < 20000  # 10 warm-up calls, then the 5 timed
    shape = bench.mlp_shape(bench.bench_args("tiny", 32, 1, "cpu"))
    report = bench.host_report(shape, 16, 2, torch.device("cpu"))
    assert set(report) == {"tokens", "cublas_fc1_us", "cublas_dgrad_us"} and report["cublas_fc1_us"] > 0
