"""tools/bench/bench_gemm.py: the GEMMs it enumerates are the model's weight matrices (6N of the FLOP count,
norms and biases aside, the tied head included) and its floor adds up what it timed."""

import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "bench")))

import bench_gemm  # noqa: E402

from megatron.training.metrics import count_non_embedding_params  # noqa: E402


def _args(size, seq=64, micro_batch=2):
    return bench_gemm.bench_args(size, seq, micro_batch, "cpu")


@pytest.mark.parametrize("size, vectors_per_layer, final", [
    # llama-1B: two RMSNorm weights per layer and the final one, no biases
    ("llama-1B", lambda h, ffn, qkv: 2 * h, lambda h: h),
    # tiny: two LayerNorms (weight + bias) per layer, biases on qkv, proj, fc1, fc2; the head tied
    ("tiny", lambda h, ffn, qkv: 4 * h + qkv + h + ffn + h, lambda h: 2 * h)])
def test_the_gemms_are_the_weight_matrices_of_the_flop_count(size, vectors_per_layer, final):
    args = _args(size)
    weights = bench_gemm.linear_weights(args)
    model = args.model
    h = model.hidden_size
    ffn = max(o for k, i, o in weights if k == "layers.mlp.linear_fc1")
    qkv = max(o for k, i, o in weights if k == "layers.attention.linear_qkv")
    matrices = sum(i * o for _, i, o in weights)
    vectors = model.num_layers * vectors_per_layer(h, ffn, qkv) + final(h)
    assert matrices + vectors == count_non_embedding_params(model, args.derived)
    kinds = {k for k, _, _ in weights}
    assert any(k.startswith("output_layer") for k in kinds), "the output projection runs a GEMM, tied or not"
    assert sum(1 for k, _, _ in weights if k == "layers.attention.linear_qkv") == model.num_layers


def test_a_step_runs_three_gemms_per_weight_six_flops_per_weight_and_token():
    args = _args("llama-1B")
    weights = bench_gemm.linear_weights(args)
    tokens = 2 * 64
    gemms = bench_gemm.step_gemms(weights, tokens)
    flops = sum(count * 2 * m * n * k for (_, _, m, n, k), count in gemms.items())
    assert flops == 6 * tokens * sum(i * o for _, i, o in weights)
    assert sum(gemms.values()) == 3 * len(weights)


def test_the_floor_is_the_sum_of_what_was_timed():
    import torch

    args = _args("tiny", seq=32, micro_batch=1)
    report = bench_gemm.floor_report(args, 1, 32, warmup=0, iters=1, attention=True, device=torch.device("cpu"))
    timed = sum(r["count"] * r["ms"] for r in report["gemms"])
    assert report["matmul_ms"] == pytest.approx(timed)
    assert report["floor_ms"] == pytest.approx(timed + report["attention_ms"])
    assert report["max_tokens_per_s"] == pytest.approx(32 / (report["floor_ms"] * 1e-3))


def test_quack_column_is_refused_off_cuda():
    with pytest.raises(SystemExit, match="CUDA only"):
        bench_gemm.main(["--sizes", "tiny", "--seq", "32", "--micro-batch", "1", "--device", "cpu", "--quack"])
