"""Attention alone, causal forward + backward in bf16: FlashAttention-4 against torch SDPA backends, per shape.

    python tools/bench/bench_attention.py --head-dims 64,128 --seqs 2048,8192,32768,131072 \
        --kernels fa4,cudnn,flash --tokens 262144 --out attn.json

Each shape is (head size d, sequence s), with `heads = 2048 / d` query heads (the 1.3B layer; `--hidden`) and
a batch of `max(1, tokens / s)` sequences, so every shape does a similar amount of work. A kernel's time is
the median of `--iters` forward + backward passes after `--warmup` (CUDA events, back to back), in the layer's
`[s, b, heads, d]` layout (megatron.model.attention_kernels, the code the model runs). TFLOP/s counts causal
attention as half the score matrix: 4 * b * heads * d * s^2 / 2 FLOPs forward, and the backward 2.5x the
forward (it recomputes the scores): 3.5x in all, FlashAttention's own convention. A kernel that fails on a shape (head size, memory) shows its error.
Prints a markdown table: the fastest kernel per shape is the one to choose for `attention_impl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

KERNELS = ("fa4", "cudnn", "flash", "efficient", "varlen")


def causal_flops(b: int, heads: int, d: int, s: int) -> float:
    """Forward + backward FLOPs of causal attention: 3.5 x the forward's 2 matmuls over half the matrix."""
    return 3.5 * 4.0 * b * heads * d * s * s / 2.0


def run_kernel(name: str, q, k, v):
    from megatron.model import attention_kernels as ak

    if name == "fa4":
        return ak.fa4_attention(q, k, v)
    if name == "varlen":  # torch's variable-length kernel, one document per row
        return ak.torch_varlen_attention(q, k, v, None, q.shape[0])
    return ak.sdpa_causal(q, k, v, backend=name)


def time_kernel(name: str, d: int, s: int, heads: int, batch: int, warmup: int, iters: int) -> dict:
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (s, batch, heads, d)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
               for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run_kernel(name, q, k, v)
        torch.autograd.backward(out, grad)
        end.record()
        if i >= warmup:
            times.append((start, end))
        q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in times)
    return {"ms": ms, "tflops": causal_flops(batch, heads, d, s) / (ms * 1e-3) / 1e12}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--seqs", default="2048,8192,32768,131072")
    parser.add_argument("--kernels", default="fa4,cudnn", help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head size (default 2048)")
    parser.add_argument("--tokens", type=int, default=131072, help="batch = max(1, tokens / seq)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", help="write the results as JSON here")
    opts = parser.parse_args(argv)
    kernels = [k for k in opts.kernels.split(",") if k]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernels {unknown}: choose from {', '.join(KERNELS)}")
    import torch

    rows = []
    for d in (int(x) for x in opts.head_dims.split(",")):
        for s in (int(x) for x in opts.seqs.split(",")):
            heads, batch = opts.hidden // d, max(1, opts.tokens // s)
            row = {"head_dim": d, "seq": s, "heads": heads, "batch": batch}
            for name in kernels:
                try:
                    row[name] = time_kernel(name, d, s, heads, batch, opts.warmup, opts.iters)
                except Exception as err:  # noqa: BLE001  (a kernel that cannot take the shape)
                    row[name] = {"error": f"{type(err).__name__}: {str(err)[:80]}"}
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ndevice {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, causal fwd+bwd, "
          f"ms (TFLOP/s causal)\n")
    print("| head dim | seq x batch | " + " | ".join(kernels) + " | fastest |")
    print("|---|---|" + "---|" * (len(kernels) + 1))
    for row in rows:
        cells, best = [], None
        for name in kernels:
            r = row[name]
            if "ms" in r:
                cells.append(f"{r['ms']:.2f} ({r['tflops']:.0f})")
                best = name if best is None or r["ms"] < row[best]["ms"] else best
            else:
                cells.append(r["error"][:40])
        print(f"| {row['head_dim']} | {row['seq']} x {row['batch']} | " + " | ".join(cells) + f" | {best} |")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
