"""Rendering results: the header (what was measured and how), one table per size, a markdown table.

Runs are the dicts the workers return plus `size`, `impl`, `status` ("ok", "OOM", "FAILED") and the
numbers from `bench_stats` (`tokens_per_s`, `tflops`, `mfu`, `median_step_s`, `ratio_vs_<baseline>`).
"""

from __future__ import annotations

from typing import Optional, Sequence

IMPL_LABELS = {"ours": "ours (DeepSpeed + Trainer)", "eager": "HF GPTNeoX eager", "compiled": "HF GPTNeoX compiled",
               "torchtitan": "torchtitan 0.2 llama3 compiled"}

FLOPS_FORMULA = ("FLOPs/token = 6*N + 12*L*h*s  (N = non-embedding parameters incl. the output layer, "
                 "L layers, h hidden, s seq; Megatron/PaLM accounting, activation recompute not counted)")


TIMING_TEXT = {
    "events": "run back to back, each timed by CUDA events on the stream",
    "synchronized": "each timed alone, device synchronized before and after",
}


def label(impl: str, variant: Optional[str] = None) -> str:
    """The row name: the implementation, and for ours the `--variant` name when there are several."""
    name = IMPL_LABELS.get(impl, impl)
    return f"{name} [{variant}]" if variant else name


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def row_cells(run: dict, baselines: Sequence[str]) -> list[str]:
    """The table cells of one run; a run that did not finish shows its status in place of numbers."""
    if run.get("status") != "ok":
        return [label(run["impl"], run.get("variant")), run.get("status", "FAILED")] + ["-"] * (6 + len(baselines)) + \
            [run.get("error", "")[:60]]
    mfu = run.get("mfu")
    cells = [
        label(run["impl"], run.get("variant")),
        _num(run["tokens_per_s"], ",.0f"),
        _num(run["tflops"], ".1f" if run["tflops"] >= 1 else ".3f"),
        "n/a" if mfu is None else f"{100 * mfu:.1f}%",
        "n/a" if run.get("mfu_causal") is None else f"{100 * run['mfu_causal']:.1f}%",
        _num(1e3 * run["median_step_s"], ".1f"),
        _num(run.get("peak_alloc_gib"), ".2f"),
        _num(run.get("peak_reserved_gib"), ".2f"),
    ]
    cells += [_num(run.get(f"ratio_vs_{base}"), ".2f") for base in baselines]
    return cells + [run.get("notes", "")]


def headers(baselines: Sequence[str]) -> list[str]:
    return (["implementation", "tokens/s", "TFLOP/s", "MFU", "causal MFU", "step ms (median)", "peak alloc GiB",
             "peak reserved GiB"] + [f"vs {base}" for base in baselines] + ["notes"])


def text_table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) if i == 0 or i == len(head) - 1 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in [head, ["-" * w for w in widths]] + rows]
    return "\n".join(lines)


def header_text(meta: dict) -> str:
    env = meta.get("env") or {}
    peak = meta.get("peak_flops")
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "device peak unknown: MFU n/a"
    return "\n".join([
        f"Throughput benchmark  {meta['date']}  commit {meta.get('commit') or 'unknown'}",
        f"device: {env.get('device_name', meta['device'])} | torch {env.get('torch')} (CUDA {env.get('cuda')}) | "
        f"deepspeed {env.get('deepspeed')} | transformers {env.get('transformers')}",
        f"seq {meta['seq']} x micro-batch {meta['micro_batch']} x grad-accum {meta.get('grad_accum', 1)} = "
        f"{meta['seq'] * meta['micro_batch'] * meta.get('grad_accum', 1)} tokens/step; "
        f"median of {meta['steps']} timed steps ({TIMING_TEXT[meta.get('timing', 'synchronized')]}) "
        f"after {meta['warmup']} warmup steps; peak memory since the end of warmup",
        FLOPS_FORMULA,
        f"TFLOP/s = tokens/s * FLOPs/token / 1e12;  MFU = TFLOP/s / device peak ({peak_text}); "
        "causal MFU counts causal attention as half the score matrix: FLOPs/token = 6N + 6 L h s",
        "ours: NeoXArgs(size config + --set) -> DeepSpeed engine (our AdamW) -> Trainer.train_step, batches from "
        "our data loader over a synthetic mmap dataset (loading included in the step time)",
        "baselines: transformers model of the same shape (sdpa), "
        + ("fp32 params + bf16 autocast, AdamW(fused)" if meta["device"] == "cuda" else "fp32, AdamW")
        + ", clip_grad_norm 1.0; pre-generated batches already on the device (no data-loader cost)",
    ])


def size_title(size: str, runs: list[dict]) -> str:
    info = next((r for r in runs if r.get("shape")), {})
    shape = info.get("shape")
    text = f"== {size} =="
    if shape:
        text = (f"== {size}: {shape['num_layers']} layers x {shape['hidden_size']} hidden, {shape['heads']} heads, "
                f"vocab {shape['padded_vocab']}, {shape['flops_per_token'] / 1e9:.2f} GFLOPs/token ==")
    return text


def render_text(meta: dict, runs: list[dict], baselines: Sequence[str]) -> str:
    parts = [header_text(meta)]
    for size in meta["sizes"]:
        size_runs = [r for r in runs if r["size"] == size]
        if not size_runs:
            continue
        parts.append("")
        parts.append(size_title(size, size_runs))
        parts.append(text_table([row_cells(r, baselines) for r in size_runs], headers(baselines)))
        for run in size_runs:
            for sync in run.get("host_syncs") or []:
                parts.append(f"  host sync in {label(run['impl'], run.get('variant'))} x{sync['count']}: "
                             f"{' <- '.join(sync['where'])}")
    return "\n".join(parts)


def render_markdown(meta: dict, runs: list[dict], baselines: Sequence[str]) -> str:
    """Rows for docs/PERFORMANCE.md: one table over all sizes, with a caption line naming device and commit."""
    env = meta.get("env") or {}
    head = ["size"] + headers(baselines)
    lines = [f"{env.get('device_name', meta['device'])}, torch {env.get('torch')}, deepspeed {env.get('deepspeed')}, "
             f"transformers {env.get('transformers')}; seq {meta['seq']}, micro-batch {meta['micro_batch']}, "
             f"grad-accum {meta.get('grad_accum', 1)}; "
             f"{meta['date']}, commit {meta.get('commit') or 'unknown'}",
             "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i in (0, 1, len(head) - 1) else "---:" for i in range(len(head))) + "|"]
    for run in runs:
        lines.append("| " + " | ".join([run["size"]] + row_cells(run, baselines)) + " |")
    return "\n".join(lines)
