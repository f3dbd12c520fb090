"""The matmul floor of one training step: every GEMM the step runs, each timed alone on this device, summed.

    python tools/bench/bench_gemm.py --sizes llama-1B --seq 2048 --micro-batch 8 --compare 76718 [--out f.json]

The model is built on the meta device from its size config (tools/bench/bench_config.py, as the throughput
bench resolves it) and its linear layers are read off it: for each weight `W [out, in]` and T = micro-batch x
seq tokens, a step runs three GEMMs, the way `torch.nn.functional.linear` and its backward lay them out:

    forward   Y  = X · Wᵀ     [T, in]  x [in, out]   2·T·in·out FLOPs
    dgrad     dX = dY · W     [T, out] x [out, in]   2·T·in·out
    wgrad     dW = dYᵀ · X    [out, T] x [T, in]     2·T·in·out

(6·T·in·out per weight: the 6N of the FLOP count, norms and biases aside.) Each distinct GEMM is timed as the
median of `--iters` back-to-back runs after `--warmup` (CUDA events; bf16 on CUDA, fp32 on CPU); the floor is
the sum over all GEMMs of a step. `--attention` adds the causal attention kernel, forward + backward, per layer
(megatron.model.attention_kernels.sdpa_causal; cuDNN on CUDA). Everything else a step does (norms, rotary,
activation, residuals, loss, optimizer, data) is outside the floor, so `tokens / floor` is an upper bound on
tokens/s that no fusion of elementwise work can pass; `--compare` prints the ratio of a measured tokens/s
(e.g. a peer's) to that bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def bench_args(size: str, seq: int, micro_batch: int, device: str):
    """The resolved NeoXArgs of `size` at seq x micro-batch, as the throughput bench builds them."""
    from bench_config import build_neox_args, vocab_for

    return build_neox_args({"size": size, "device": device, "seq": seq, "micro_batch": micro_batch, "warmup": 0,
                            "steps": 1, "grad_accum": 1, "overrides": {}, "cache_dir": "/tmp/neox_bench",
                            "data_prefix": "data/bundled/pystdlib_text_document", "vocab": vocab_for(size)})


def linear_weights(args) -> list[tuple[str, int, int]]:
    """(kind, in, out) of every weight matrix the model multiplies by, from a model built on the meta device.
    `kind` is the module name with layer numbers dropped (`layers.linear_qkv`, `output_layer`)."""
    import torch

    from megatron import mpu
    from megatron.model import GPTModel

    with torch.device("meta"):
        model = GPTModel(args.model, args.derived, mpu.ParallelState.single())
    weights = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or "Embedding" in type(module).__name__:
            continue  # a lookup table (the input embedding) runs no GEMM; norms have 1-D weights
        kind = ".".join(part for part in name.split(".") if not part.isdigit())
        out_features, in_features = weight.shape
        weights.append((kind, in_features, out_features))
    if model.output_layer is None:  # tied: the logits multiply by the embedding table, [V, h]
        vocab, hidden = model.output_weight.shape
        weights.append(("output_layer (tied to the embedding)", hidden, vocab))
    return weights


def step_gemms(weights: list[tuple[str, int, int]], tokens: int) -> Counter:
    """{(kind, pass, m, n, k): count} of one step's GEMMs, `m x k` times `k x n`."""
    gemms: Counter = Counter()
    for kind, fan_in, fan_out in weights:
        gemms[(kind, "forward", tokens, fan_out, fan_in)] += 1
        gemms[(kind, "dgrad", tokens, fan_in, fan_out)] += 1
        gemms[(kind, "wgrad", fan_out, fan_in, tokens)] += 1
    return gemms


def _operands(pass_: str, m: int, n: int, k: int, dtype, device):
    """The operands in F.linear's layouts: forward x @ w.t(), dgrad dy @ w, wgrad dy.t() @ x."""
    import torch

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    if pass_ == "forward":  # x [m, k], w [n, k]
        return rand(m, k), rand(n, k).t()
    if pass_ == "dgrad":  # dy [m, k], w [k, n]
        return rand(m, k), rand(k, n)
    return rand(k, m).t(), rand(k, n)  # wgrad: dy [T=k, out=m] transposed, x [T=k, in=n]


def _time(fn, warmup: int, iters: int, device) -> float:
    """Median ms of `fn()` over `iters` runs after `warmup` (CUDA events on CUDA, wall clock on CPU)."""
    import time

    import torch

    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            if i >= warmup:
                times.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in times]
    return statistics.median(times)


def time_gemm(pass_: str, m: int, n: int, k: int, warmup: int, iters: int, dtype, device, quack=None) -> float:
    """ms of the GEMM on cuBLAS (`a @ b`) or, given `quack.gemm_interface`, on quack's autotuned GEMM."""
    a, b = _operands(pass_, m, n, k, dtype, device)
    if quack is not None:
        return _time(lambda: quack.gemm(a, b, tuned=True), warmup, iters, device)
    return _time(lambda: a @ b, warmup, iters, device)


def time_attention(args, micro_batch: int, seq: int, warmup: int, iters: int, dtype, device) -> float:
    """ms of one layer's causal attention, forward + backward, `[s, b, heads, d]` as the model calls it."""
    import torch

    from megatron.model import attention_kernels as ak

    model = args.model
    heads = model.num_attention_heads
    kv = getattr(model, "num_kv_heads", None) or heads
    d = model.hidden_size // heads
    q = torch.randn(seq, micro_batch, heads, d, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(seq, micro_batch, kv, d, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)
    backend = "cudnn" if device.type == "cuda" else None

    def fwd_bwd():
        out = ak.sdpa_causal(q, k, v, backend=backend)
        torch.autograd.backward(out, grad)
        q.grad = k.grad = v.grad = None

    return _time(fwd_bwd, warmup, iters, device)


def floor_report(args, micro_batch: int, seq: int, warmup: int, iters: int, attention: bool, device,
                 quack=None) -> dict:
    """Per GEMM: count, ms, TFLOP/s; and the floor: matmul ms per step, attention ms per step, the bound.
    With `quack` (quack.gemm_interface) each GEMM is also timed on quack's autotuned kernel (`quack_ms`),
    and `matmul_ms_quack` / `matmul_ms_best` sum quack's times and the faster of the two per GEMM."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = micro_batch * seq
    rows = []
    total_ms = total_flops = 0.0
    for (kind, pass_, m, n, k), count in sorted(step_gemms(linear_weights(args), tokens).items()):
        ms = time_gemm(pass_, m, n, k, warmup, iters, dtype, device)
        flops = 2.0 * m * n * k
        rows.append({"kind": kind, "pass": pass_, "m": m, "n": n, "k": k, "count": count, "ms": ms,
                     "tflops": flops / (ms * 1e-3) / 1e12})
        if quack is not None:
            rows[-1]["quack_ms"] = time_gemm(pass_, m, n, k, warmup, iters, dtype, device, quack)
        total_ms += count * ms
        total_flops += count * flops
    report = {"tokens_per_step": tokens, "gemms": rows, "matmul_ms": total_ms, "matmul_flops": total_flops,
              "matmul_tflops": total_flops / (total_ms * 1e-3) / 1e12}
    if quack is not None:
        report["matmul_ms_quack"] = sum(r["count"] * r["quack_ms"] for r in rows)
        report["matmul_ms_best"] = sum(r["count"] * min(r["ms"], r["quack_ms"]) for r in rows)
    floor_ms = total_ms
    if attention:
        per_layer = time_attention(args, micro_batch, seq, warmup, iters, dtype, device)
        report["attention_ms"] = per_layer * args.model.num_layers
        floor_ms += report["attention_ms"]
    report["floor_ms"] = floor_ms
    report["max_tokens_per_s"] = tokens / (floor_ms * 1e-3)
    return report


def kernel_bench_parser(description: str, default_sizes: str) -> argparse.ArgumentParser:
    """The options every per-kernel bench here shares: sizes, seq, micro-batch, timing, device, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default=default_sizes, help="comma-separated size names or YAML paths")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", help="write the reports as JSON here")
    return parser


def write_reports(opts, device, reports: dict) -> None:
    """The reports of a `kernel_bench_parser` run as JSON at `--out`, with device, torch and shape."""
    import torch

    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "seq": opts.seq,
                       "micro_batch": opts.micro_batch, "reports": reports}, f, indent=1)


def main(argv=None) -> int:
    parser = kernel_bench_parser(__doc__.split("\n")[0], "llama-1B")
    parser.add_argument("--attention", action="store_true", help="add the causal attention kernel (fwd + bwd)")
    parser.add_argument("--compare", type=float, action="append", default=[],
                        help="a measured tokens/s to set against the bound (repeatable)")
    parser.add_argument("--quack", action="store_true",
                        help="also time each GEMM on quack's autotuned kernel (CUDA, quack-kernels installed)")
    opts = parser.parse_args(argv)
    import torch

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quack = None
    if opts.quack:
        from bench_mlp_epilogue import import_quack

        if device.type != "cuda":
            raise SystemExit("--quack: quack's kernels run on CUDA only (this run's device is the CPU)")
        quack = import_quack(required=True)
    reports = {}
    for size in [s for s in opts.sizes.split(",") if s]:
        args = bench_args(size, opts.seq, opts.micro_batch, device.type)
        report = floor_report(args, opts.micro_batch, opts.seq, opts.warmup, opts.iters, opts.attention, device,
                              quack)
        reports[size] = report
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"\n== {size}: seq {opts.seq} x micro-batch {opts.micro_batch} = {report['tokens_per_step']} tokens, "
              f"{name}, torch {torch.__version__} ==")
        print("| GEMM | pass | m x n x k | per step | ms each | TFLOP/s | quack ms |\n|---|---|---|---:|---:|---:|---:|")
        for r in report["gemms"]:
            print(f"| {r['kind']} | {r['pass']} | {r['m']} x {r['n']} x {r['k']} | {r['count']} | {r['ms']:.3f} | "
                  f"{r['tflops']:.0f} | {r.get('quack_ms', float('nan')):.3f} |")
        line = f"matmuls: {report['matmul_ms']:.1f} ms per step at {report['matmul_tflops']:.0f} TFLOP/s"
        if quack is not None:
            line += (f" (quack: {report['matmul_ms_quack']:.1f} ms; the faster of the two per GEMM: "
                     f"{report['matmul_ms_best']:.1f} ms)")
        if "attention_ms" in report:
            line += f"; attention kernel: {report['attention_ms']:.1f} ms"
        print(f"{line}; floor {report['floor_ms']:.1f} ms -> at most {report['max_tokens_per_s']:,.0f} tokens/s")
        for measured in opts.compare:
            print(f"  {measured:,.0f} tokens/s measured = {measured / report['max_tokens_per_s']:.3f} of the bound; "
                  f"1.2x it would be {1.2 * measured / report['max_tokens_per_s']:.3f}")
    write_reports(opts, device, reports)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
