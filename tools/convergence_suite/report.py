"""report.md and results.json of a suite (written after every run, so a partial report survives).

One entry per run (see `build_entry`): references carry their curves, variants also their comparison
with their reference and a verdict. results.json holds everything (curves, per-step differences);
report.md is the table a reviewer reads, the reasons of each failure and the PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

from convergence_suite.compare import compare_curves, curves_from_records, speed_and_memory, verdict


def build_entry(run, result, reference_entry: Optional[dict]) -> dict:
    """The report entry of `run` (suite.Run) from its runner.RunResult; variants need their reference's
    entry (None when the reference has not run yet)."""
    train, valid = curves_from_records(result.records)
    speed, memory = speed_and_memory(result.records)
    entry = {
        "name": run.name, "is_reference": run.is_reference, "reference": run.reference,
        "resume_at": run.resume_at, "overrides": run.overrides, "returncode": result.returncode,
        "error": result.error, "seconds": round(result.seconds, 1), "run_dir": result.run_dir,
        "reused": result.reused, "train": train, "valid": valid, "last_step": result.last_step,
        "final_train": train[max(train)] if train else None, "final_valid": valid[max(valid)] if valid else None,
        "tokens_per_s": speed, "peak_mem_gib": memory,
        "tolerance": dataclasses.asdict(run.tolerance) if run.tolerance else None,
    }
    if run.is_reference:
        entry["status"] = "reference" if result.ok else "reference FAILED"
        entry["passed"] = result.ok
        entry["reasons"] = [] if result.ok else [f"exit {result.returncode}" + (f"; {result.error}" if result.error
                                                                                else "")]
        return entry
    ref_ok = reference_entry is not None and reference_entry["returncode"] == 0 and not reference_entry["error"]
    tol = run.tolerance
    train_cmp = compare_curves(reference_entry["train"], train, tol.train_loss, tol.window) if ref_ok else None
    valid_cmp = None
    if ref_ok and reference_entry["valid"]:
        valid_cmp = compare_curves(reference_entry["valid"], valid, tol.valid_loss, tol.window)
    passed, reasons = verdict(result.returncode, ref_ok, train_cmp, valid_cmp, result.last_step, result.error)
    where = None
    for curve, label in ((train_cmp, "train"), (valid_cmp, "valid")):
        if curve is not None and curve.first_violation is not None and where is None:
            where = f"{label} out of band from step {curve.first_violation[0]}"
    if where is None and not passed:
        where = reasons[0] if reasons else None
    entry.update(train_cmp=train_cmp, valid_cmp=valid_cmp, passed=passed, reasons=reasons,
                 status="pass" if passed else "FAIL", where=where)
    return entry


def exit_code(entries: list) -> int:
    """0 when every variant passed (and every reference finished), else 1."""
    return 0 if all(e["passed"] for e in entries) else 1


def _json_curve(curve) -> Optional[dict]:
    if curve is None:
        return None
    data = dataclasses.asdict(curve)
    data["diffs"] = {str(k): v for k, v in curve.diffs.items()}
    data["within"] = curve.within
    return data


def write_results_json(path: str, header: dict, entries: list) -> None:
    runs = []
    for entry in entries:
        data = dict(entry)
        data["train"] = {str(k): v for k, v in entry["train"].items()}
        data["valid"] = {str(k): v for k, v in entry["valid"].items()}
        for key in ("train_cmp", "valid_cmp"):
            if key in data:
                data[key] = _json_curve(entry[key])
        runs.append(data)
    with open(path, "w") as handle:
        json.dump({**header, "runs": runs}, handle, indent=1, default=_finite)


def _finite(value):
    return str(value)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def render_markdown(header: dict, entries: list, png_name: str = "loss_curves.png") -> str:
    variants = [e for e in entries if not e["is_reference"]]
    passed = sum(1 for e in variants if e["passed"])
    tol = header["tolerance"]
    lines = [
        f"# Convergence suite `{header['suite']}`",
        "",
        f"{header['date']}, commit `{header['commit']}`, suite file `{header['suite_path']}`"
        + (f", {header['pending']} run(s) not finished yet" if header.get("pending") else "") + ".",
        f"Command: `{header['command']}`." if header.get("command") else "",
        f"Tolerance (suite default): |variant - reference| train loss <= {tol['train_loss']:.3g}, validation loss "
        f"<= {tol['valid_loss']:.3g}, at every logged step of the reference"
        + (f" (moving averages over {tol['window']} points)" if tol["window"] > 1 else "") + ".",
        "",
        f"**{'PASS' if header['exit_code'] == 0 else 'FAIL'}: {passed}/{len(variants)} variants within tolerance.**",
        "",
        f"![loss curves]({png_name})",
        "",
        "| run | vs | status | steps compared | max abs Δ train | mean abs Δ train | max abs Δ valid | "
        "final train | final valid | tokens/s | peak mem GiB | tolerance train / valid |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        train_cmp, valid_cmp = e.get("train_cmp"), e.get("valid_cmp")
        tolerance = e["tolerance"]
        lines.append(
            f"| {e['name']}{' (resume at ' + str(e['resume_at']) + ')' if e['resume_at'] else ''} | "
            f"{e['reference'] or '-'} | {e['status']} | "
            f"{train_cmp.steps_compared if train_cmp else '-'} | "
            f"{_fmt(train_cmp.max_abs if train_cmp else None, '.2e')} | "
            f"{_fmt(train_cmp.mean_abs if train_cmp else None, '.2e')} | "
            f"{_fmt(valid_cmp.max_abs if valid_cmp else None, '.2e')} | "
            f"{_fmt(e['final_train'], '.5f')} | {_fmt(e['final_valid'], '.5f')} | "
            f"{_fmt(e['tokens_per_s'], ',.0f')} | {_fmt(e['peak_mem_gib'], '.2f')} | "
            + (f"{tolerance['train_loss']:.2g} / {tolerance['valid_loss']:.2g} |" if tolerance else "- |"))
    failures = [e for e in entries if not e["passed"]]
    if failures:
        lines += ["", "## Not within tolerance", ""]
        lines += [f"- **{e['name']}**: " + "; ".join(e["reasons"]) for e in failures]
    lines += ["", "## Runs", ""]
    for e in entries:
        overrides = " ".join(f"{k}={v}" for k, v in e["overrides"].items()) or "(suite config)"
        lines.append(f"- `{e['name']}`: {overrides}; exit {e['returncode']}, {e['seconds']:.0f} s"
                     + (" (reused)" if e["reused"] else "") + f"; files in `{e['run_dir']}`")
    return "\n".join(lines) + "\n"
