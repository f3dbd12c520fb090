"""Plain arithmetic of the benchmark: step-time summaries, throughput, MFU and ratios.

Nothing here touches a device, so it is unit-tested directly. The FLOP count itself comes from
`megatron.training.metrics.flops_per_token`, shared with the trainer's own logging, in both conventions:
6 N + 12 L h s (full score matrix, Megatron/PaLM: `tflops`, `mfu`) and 6 N + 6 L h s (causal attention as
half the score matrix: `tflops_causal`, `mfu_causal`).
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence


def summarize_step_times(times_s: Sequence[float]) -> dict:
    """Median (the reported number), mean, min and max of per-step wall times in seconds."""
    if not times_s:
        raise ValueError("no step times to summarize: run at least one timed step (--steps >= 1).")
    return {
        "median_step_s": float(statistics.median(times_s)),
        "mean_step_s": float(statistics.fmean(times_s)),
        "min_step_s": float(min(times_s)),
        "max_step_s": float(max(times_s)),
    }


def throughput(tokens_per_step: int, step_s: float, flops_per_token: float,
               peak_flops: Optional[float], flops_per_token_causal: Optional[float] = None) -> dict:
    """tokens/s = tokens_per_step / step_s; TFLOP/s = tokens/s * flops_per_token / 1e12;
    MFU = achieved FLOP/s / peak FLOP/s (None when the device peak is unknown, e.g. on CPU).
    `tflops_causal` / `mfu_causal` are the same with `flops_per_token_causal` (default: flops_per_token)."""
    if step_s <= 0:
        raise ValueError(f"step time must be positive, got {step_s}")
    if flops_per_token_causal is None:
        flops_per_token_causal = flops_per_token
    tokens_per_s = tokens_per_step / step_s
    flops = tokens_per_s * flops_per_token
    flops_causal = tokens_per_s * flops_per_token_causal
    return {
        "tokens_per_s": tokens_per_s,
        "tflops": flops / 1e12,
        "mfu": flops / peak_flops if peak_flops else None,
        "tflops_causal": flops_causal / 1e12,
        "mfu_causal": flops_causal / peak_flops if peak_flops else None,
    }


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, or None when either is missing (failed/OOM run) or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def add_ratios(runs: list[dict], baselines: Sequence[str]) -> None:
    """Set `ratio_vs_<baseline>` = tokens/s of the run / tokens/s of that baseline of the same size.

    Runs are dicts with `size`, `impl`, `status` and `tokens_per_s` (absent unless status is "ok").
    """
    for run in runs:
        for base in baselines:
            ref = next((r for r in runs if r["size"] == run["size"] and r["impl"] == base
                        and r.get("status") == "ok"), None)
            mine = run.get("tokens_per_s") if run.get("status") == "ok" else None
            run[f"ratio_vs_{base}"] = ratio(mine, ref.get("tokens_per_s") if ref else None)
