"""loss_curves.png: four panels, one colour per run, the same in every panel.

    train loss by step              | validation loss by step
    |variant - reference| train     | |variant - reference| validation     (log scale, tolerance dashed)

References are thick grey/black lines; a variant's legend entry says whether it passed. Exact agreement
(a difference of 0) cannot sit on a log axis: it is drawn at the floor of the axis, which is labelled.
matplotlib runs headless (the Agg backend).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REFERENCE_COLOURS = ["black", "dimgray", "darkgray"]
# tab10 without its grey (kept for references), then tab20's lighter shades
VARIANT_COLOURS = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + \
    [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i % 2 == 1 and i not in (14, 15)]


def _floor(entries: list, key: str) -> float:
    """The lowest value of a |diff| axis: a decade below the smallest non-zero difference or tolerance."""
    values = [abs(d) for e in entries if e.get(key) for d in e[key].diffs.values() if d and math.isfinite(d)]
    values += [e[key].tolerance for e in entries if e.get(key) and e[key].tolerance > 0]
    return 10 ** math.floor(math.log10(min(values))) / 10 if values else 1e-8


def _diff_panel(ax, entries: list, key: str, title: str, colours: dict) -> None:
    floor = _floor(entries, key)
    tolerances = sorted({e[key].tolerance for e in entries if e.get(key)})
    for entry in entries:
        curve = entry.get(key)
        if not curve or not curve.diffs:
            continue
        steps = sorted(curve.diffs)
        values = [max(abs(curve.diffs[s]), floor) if math.isfinite(curve.diffs[s]) else None for s in steps]
        ax.plot(steps, [v if v is not None else float("nan") for v in values], color=colours[entry["name"]],
                lw=1.4, marker="o" if len(steps) <= 12 else None, ms=3)
    for tol in tolerances:
        ax.axhline(max(tol, floor), color="red", ls="--", lw=1.2)
        ax.annotate(f"tolerance {tol:.2g}", xy=(1.0, max(tol, floor)), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", color="red", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor * 0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(f"|variant - reference| (exact = {floor:.0e})")
    ax.grid(True, which="major", alpha=0.3)


def _loss_panel(ax, entries: list, key: str, title: str, colours: dict) -> None:
    for entry in entries:
        curve = entry.get(key) or {}
        if not curve:
            continue
        steps = sorted(curve)
        ref = entry["is_reference"]
        ax.plot(steps, [curve[s] for s in steps], color=colours[entry["name"]], lw=2.6 if ref else 1.2,
                ls="-" if ref else "--", marker="o" if len(steps) <= 12 else None, ms=3, zorder=1 if ref else 2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)


def plot_loss_curves(path: str, suite_name: str, entries: list, subtitle: str = "") -> None:
    """Write the PNG. `entries`: one dict per run with name, is_reference, reference, passed (variants),
    train / valid ({step: loss}) and train_cmp / valid_cmp (compare.CurveComparison or None)."""
    refs = [e for e in entries if e["is_reference"]]
    variants = [e for e in entries if not e["is_reference"]]
    colours = {e["name"]: REFERENCE_COLOURS[i % len(REFERENCE_COLOURS)] for i, e in enumerate(refs)}
    colours.update({e["name"]: VARIANT_COLOURS[i % len(VARIANT_COLOURS)] for i, e in enumerate(variants)})

    columns = 3
    legend_rows = -(-(len(refs) + len(variants)) // columns)
    legend_height = 0.3 * legend_rows + 0.4  # inches
    fig, axes = plt.subplots(2, 2, figsize=(15, 9.5 + legend_height), dpi=100)
    _loss_panel(axes[0][0], entries, "train", "train loss", colours)
    _loss_panel(axes[0][1], entries, "valid", "validation loss", colours)
    _diff_panel(axes[1][0], variants, "train_cmp", "train loss: |variant - its reference|", colours)
    _diff_panel(axes[1][1], variants, "valid_cmp", "validation loss: |variant - its reference|", colours)

    handles, labels = [], []
    for entry in refs + variants:
        handles.append(plt.Line2D([], [], color=colours[entry["name"]], lw=2.6 if entry["is_reference"] else 1.6,
                                  ls="-" if entry["is_reference"] else "--"))
        if entry["is_reference"]:
            labels.append(f"{entry['name']} (reference)")
        else:
            mark = "PASS" if entry["passed"] else "FAIL"
            where = entry.get("where")
            labels.append(f"{entry['name']} vs {entry['reference']}: {mark}" + (f" ({where})" if where else ""))
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=True)
    passed = sum(1 for e in variants if e["passed"])
    fig.suptitle(f"convergence suite {suite_name}: {passed}/{len(variants)} variants within tolerance"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=12)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
