"""Step-by-step comparison of a variant's loss curve with its reference's (pure functions, no I/O).

A curve is `{step: loss}` from metrics.jsonl (train records, or eval records of the "valid" split).
Alignment: the variant is compared at the reference's logged steps. A reference step the variant did not
log is MISSING (the variant stopped early, crashed, or logged at other steps): a failure, since nothing
shows the curves agree there. Steps only the variant logged are ignored. With `window` > 1 both curves
are replaced, over the common steps, by their trailing moving averages over `window` points, compared
from the first full window on (bf16 suites: the band then bounds the drift, not the step-to-step noise). A variant is within the band when at every
common step |variant - reference| <= tolerance; a NaN or infinite variant loss is out of the band.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CurveComparison:
    """How one variant curve (train or valid) compares with the reference's."""

    tolerance: float
    steps_compared: int = 0
    max_abs: Optional[float] = None  # max |variant - reference| over the common steps
    mean_abs: Optional[float] = None
    first_violation: Optional[tuple] = None  # (step, |diff|) where it first left the band
    missing_steps: list = field(default_factory=list)  # reference steps the variant did not log
    diffs: dict = field(default_factory=dict)  # step -> variant - reference (after the moving average)

    @property
    def within(self) -> bool:
        return self.first_violation is None and not self.missing_steps


def moving_average(values: list, window: int) -> list:
    """Trailing mean over up to `window` points: out[i] = mean(values[max(0, i-window+1) : i+1])."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def compare_curves(reference: dict, variant: dict, tolerance: float, window: int = 1) -> CurveComparison:
    """Compare `variant` with `reference` ({step: loss}) at the reference's steps (module docstring)."""
    result = CurveComparison(tolerance=tolerance)
    steps = sorted(reference)
    common = [s for s in steps if s in variant]
    result.missing_steps = [s for s in steps if s not in variant]
    if not common:
        return result
    ref_values = [float(reference[s]) for s in common]
    var_values = [float(variant[s]) for s in common]
    if window > 1:  # compare from the first full window on
        ref_values = moving_average(ref_values, window)[window - 1:]
        var_values = moving_average(var_values, window)[window - 1:]
        common = common[window - 1:]
        if not common:
            return result
    abs_diffs = []
    for step, ref, var in zip(common, ref_values, var_values):
        diff = var - ref if math.isfinite(var) else math.inf
        result.diffs[step] = diff
        abs_diffs.append(abs(diff))
        if result.first_violation is None and not abs(diff) <= tolerance:
            result.first_violation = (step, abs(diff))
    result.steps_compared = len(common)
    result.max_abs = max(abs_diffs)
    result.mean_abs = statistics.fmean(abs_diffs) if all(math.isfinite(d) for d in abs_diffs) else math.inf
    return result


def format_steps(steps: list) -> str:
    """Steps for a message: [1, 3] -> '1, 3'; [10, 20, 30, 40, 50] -> '10-50 every 10'; [3, 4, 5, 9, 12] ->
    '3-5, 9, 12' (runs of consecutive steps, at most 8 parts)."""
    steps = sorted(steps)
    if len(steps) <= 3:
        return ", ".join(map(str, steps))
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if len(gaps) == 1:
        gap = gaps.pop()
        return f"{steps[0]}-{steps[-1]}" + (f" every {gap}" if gap > 1 else "")
    parts, start, prev = [], steps[0], steps[0]
    for step in steps[1:] + [None]:
        if step is not None and step == prev + 1:
            prev = step
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if step is not None:
            start = prev = step
    return ", ".join(parts[:8]) + (", ..." if len(parts) > 8 else "")


def verdict(returncode: Optional[int], reference_ok: bool, train: Optional[CurveComparison],
            valid: Optional[CurveComparison], last_step: Optional[int] = None, error: Optional[str] = None) -> tuple:
    """(passed, reasons) of a variant: it passes when it and its reference finished (exit 0, no harness
    `error` such as a resume that did not continue), and both curves are within the band with no missing
    step. `reasons` say why not, and where it left the band; `last_step` is the variant's last logged step."""
    reasons = []
    if not reference_ok:
        reasons.append("its reference did not finish (nothing to compare with)")
    if returncode is None:
        reasons.append("not run")
    elif returncode != 0:
        reasons.append(f"crashed (exit {returncode})" + (f" after step {last_step}" if last_step is not None else
                                                          " before logging a step"))
    if error:
        reasons.append(error)
    for label, curve in (("train loss", train), ("valid loss", valid)):
        if curve is None or not reference_ok:
            continue
        if curve.first_violation is not None:
            step, diff = curve.first_violation
            reasons.append(f"{label} left the band at step {step}: |diff| {diff:.3g} > {curve.tolerance:.3g} "
                           f"(max {curve.max_abs:.3g})")
        if curve.missing_steps and (returncode == 0 or label == "train loss"):
            reasons.append(f"{label}: {len(curve.missing_steps)} reference step(s) missing "
                           f"({format_steps(curve.missing_steps)})")
    return not reasons, reasons


def curves_from_records(records: list) -> tuple:
    """metrics.jsonl records -> ({step: train loss}, {step: valid loss}); a step logged twice keeps the last."""
    train, valid = {}, {}
    for record in records:
        if record.get("type") == "train" and "loss" in record:
            train[int(record["iteration"])] = float(record["loss"])
        elif record.get("type") == "eval" and record.get("name", "valid") == "valid" and "loss" in record:
            valid[int(record["iteration"])] = float(record["loss"])
    return train, valid


def speed_and_memory(records: list) -> tuple:
    """(median tokens/s over the train records after the first, which holds warm-up; peak_mem_gib max or
    None when the records have none, e.g. on CPU)."""
    train = [r for r in records if r.get("type") == "train"]
    speeds = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")] or \
             [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    memory = [r["peak_mem_gib"] for r in train if r.get("peak_mem_gib") is not None]
    return (statistics.median(speeds) if speeds else None), (max(memory) if memory else None)
