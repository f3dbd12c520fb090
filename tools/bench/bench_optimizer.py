"""BF16_Optimizer's step on one GPU, alone: torch's fused AdamW plus DeepSpeed's copy of the masters into the
bf16 weights, against megatron/engine/fused_adamw.py (the two in one Triton kernel, `fused_optimizer_step`).

    python tools/bench/bench_optimizer.py --sizes 410M,1.3B,llama-1B [--out f.json]

For each size the model is built on the meta device to get its two parameter groups (decayed matrices,
undecayed 1-D parameters: megatron/training/optimizer.py), each one flat fp32 master as BF16_Optimizer
holds it at one data-parallel rank, with fp32 gradients, both Adam moments and the flat bf16 weights on the
device. Both sides take the step as our patched BF16_Optimizer.step hands it over (a device found_inf of 0
and a clipping divisor grad_scale). Timed: median of --iters steps after --warmup (CUDA events); the bytes
each side moves per parameter are printed with the bandwidth they imply (torch 28 + copy 6, fused 30);
the fused kernel is timed at a few block sizes (`CONFIGS`), the module's own reported as its time. Then
one micro-batch a step's two ways (bf16 gradients, one tensor a parameter): folded into the flat fp32
gradient and the fused kernel, against the gathered kernel reading them in place (gathered 28 bytes).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemm import _time, bench_args, kernel_bench_parser, write_reports  # noqa: E402

CONFIGS = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 16))
"""(BLOCK, num_warps) of the fused kernel timed besides the module's default."""
BYTES_PER_PARAM = {"torch": 28 + 6, "fused": 30, "gathered": 28}
"""HBM bytes per parameter: torch's AdamW reads grad, p, m, v and writes p, m, v (fp32), the copy reads p and
writes bf16; the fused kernel does the same reads and writes once, bf16 included."""


def group_numels(args) -> list[list[int]]:
    """Each parameter's elements, in the decayed (ndim >= 2) and undecayed groups of the full model (meta device)."""
    from megatron.launcher.dry_run import meta_model

    model, _ = meta_model(args)
    decay = [p.numel() for p in model.parameters() if p.ndim >= 2]
    no_decay = [p.numel() for p in model.parameters() if p.ndim < 2]
    return [group for group in (decay, no_decay) if group]


def bench_size(size: str, opts, device) -> dict:
    import torch

    from megatron.engine import fused_adamw

    numels = group_numels(bench_args(size, opts.seq, opts.micro_batch, "cpu"))
    sizes = [sum(group) for group in numels]
    generator = torch.Generator(device=device).manual_seed(0)
    masters = [torch.nn.Parameter(torch.randn(n, device=device, generator=generator)) for n in sizes]
    for master in masters:
        master.grad = torch.randn(master.shape, device=device, generator=generator) * 1e-3
    lp = [torch.empty(n, device=device, dtype=torch.bfloat16) for n in sizes]
    groups = [{"params": [masters[0]], "weight_decay": 0.1}] + [{"params": [m], "weight_decay": 0.0}
                                                                 for m in masters[1:]]
    found_inf = torch.zeros((), device=device)
    grad_scale = torch.full((), 1.5, device=device)
    report = {"params": sum(sizes), "groups": sizes}

    torch_adamw = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def torch_step():
        torch_adamw.found_inf, torch_adamw.grad_scale = found_inf, grad_scale
        torch_adamw.step()
        for master, weights in zip(masters, lp):
            weights.copy_(master.detach())

    copies = [torch.nn.Parameter(master.detach().clone()) for master in masters]
    fused = torch.optim.AdamW([dict(group, params=[copy]) for group, copy in zip(groups, copies)], lr=1e-4,
                              betas=(0.9, 0.95), eps=1e-8, fused=True)
    for copy, master in zip(copies, masters):
        copy.grad = master.grad
    targets = [[weights] for weights in lp]
    assert fused_adamw.applies(fused, targets), "fused_adamw does not apply on this device"

    def fused_step():
        fused_adamw.step_(fused, targets, found_inf, grad_scale)

    report["torch_ms"] = _time(torch_step, opts.warmup, opts.iters, device)
    report["torch_tb_s"] = BYTES_PER_PARAM["torch"] * report["params"] / report["torch_ms"] / 1e9
    default = (fused_adamw.BLOCK, fused_adamw.NUM_WARPS)
    report["fused_configs"] = {}
    try:
        for block, warps in CONFIGS:
            fused_adamw.BLOCK, fused_adamw.NUM_WARPS = block, warps
            report["fused_configs"][f"{block}x{warps}"] = _time(fused_step, opts.warmup, opts.iters, device)
    finally:
        fused_adamw.BLOCK, fused_adamw.NUM_WARPS = default
    report["fused_ms"] = report["fused_configs"][f"{default[0]}x{default[1]}"]
    report["fused_tb_s"] = BYTES_PER_PARAM["fused"] * report["params"] / report["fused_ms"] / 1e9
    report["fused_vs_torch"] = report["torch_ms"] / report["fused_ms"]

    # one micro-batch a step at one data-parallel rank (bf16_optimizer_patches item 6): each parameter's bf16
    # gradient its own tensor, as autograd leaves it; folded into fp32 views of the flat gradient first
    # (items 1 + 5), or read where it lies by the gathered kernel
    bf16_grads = [[torch.randn(n, device=device, generator=generator).mul_(1e-3).bfloat16() for n in group]
                  for group in numels]
    offsets = [[sum(group[:i]) for i in range(len(group))] for group in numels]
    views = [[copy.grad[o:o + n] for o, n in zip(group_offsets, group)]
             for copy, group_offsets, group in zip(copies, offsets, numels)]
    layouts = [fused_adamw.GradLayout(o, n, device) for o, n in zip(offsets, numels)]

    def fold_and_fused_step():
        for group_views, group_grads in zip(views, bf16_grads):
            torch._foreach_copy_(group_views, group_grads)
        fused_adamw.step_(fused, targets, found_inf, grad_scale)

    def gathered_step():
        fused_adamw.step_gathered_(fused, targets, bf16_grads, layouts, found_inf, grad_scale)

    report["fold_and_fused_ms"] = _time(fold_and_fused_step, opts.warmup, opts.iters, device)
    report["gathered_ms"] = _time(gathered_step, opts.warmup, opts.iters, device)
    report["gathered_aligned"] = all(layout.aligned for layout in layouts)
    report["gathered_tb_s"] = BYTES_PER_PARAM["gathered"] * report["params"] / report["gathered_ms"] / 1e9
    print(f"{size}: {report['params'] / 1e6:.1f} M parameters; torch AdamW + copy {report['torch_ms']:.3f} ms "
          f"({report['torch_tb_s']:.2f} TB/s), fused {report['fused_ms']:.3f} ms ({report['fused_tb_s']:.2f} TB/s): "
          f"{report['fused_vs_torch']:.2f}x; BLOCK x warps: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["fused_configs"].items())
          + f"; fold + fused {report['fold_and_fused_ms']:.3f} ms, gathered from bf16 gradients "
            f"{report['gathered_ms']:.3f} ms ({report['gathered_tb_s']:.2f} TB/s, aligned: "
            f"{report['gathered_aligned']})", flush=True)
    return report


def main(argv=None) -> int:
    import torch

    opts = kernel_bench_parser(__doc__.split("\n")[0], "410M,1.3B,llama-1B").parse_args(argv)
    device = torch.device(opts.device or "cuda")
    if device.type != "cuda":
        raise SystemExit("bench_optimizer: the fused step is a CUDA kernel; run it on a GPU")
    reports = {}
    for size in opts.sizes.split(","):
        reports[size] = bench_size(size, opts, device)
        torch.cuda.empty_cache()
    write_reports(opts, device, reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
