"""tools/convergence_suite: the step-by-step comparison (alignment, tolerance, missing steps, NaN, moving
average), the verdict of a crashed variant, and the report and PNG of a partial suite."""

from __future__ import annotations

import math
import os
import sys

import pytest

TOOLS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
for path in (TOOLS, os.path.join(TOOLS, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

from convergence_suite.compare import (  # noqa: E402
    compare_curves,
    curves_from_records,
    format_steps,
    moving_average,
    speed_and_memory,
    verdict,
)
from convergence_suite.report import build_entry, exit_code, render_markdown  # noqa: E402
from convergence_suite.runner import RunResult, join_resumed  # noqa: E402
from convergence_suite.suite import Run, Tolerance  # noqa: E402

REF = {1: 5.0, 2: 4.5, 3: 4.0, 4: 3.8}


def test_steps_are_aligned_by_step_not_by_position():
    variant = {4: 3.8, 2: 4.5 + 1e-6, 3: 4.0, 1: 5.0, 5: 9.9}  # order and an extra step do not matter
    cmp = compare_curves(REF, variant, tolerance=1e-5)
    assert cmp.within and cmp.steps_compared == 4 and not cmp.missing_steps
    assert cmp.max_abs == pytest.approx(1e-6) and cmp.mean_abs == pytest.approx(0.25e-6)
    assert set(cmp.diffs) == {1, 2, 3, 4}


def test_tolerance_is_inclusive_and_the_first_step_out_of_band_is_reported():
    variant = {1: 5.0, 2: 4.5 + 0.25, 3: 4.0 + 0.5, 4: 3.8}
    assert compare_curves(REF, variant, tolerance=0.5).within  # |diff| == tolerance is inside
    cmp = compare_curves(REF, variant, tolerance=0.3)
    assert not cmp.within and cmp.first_violation == (3, pytest.approx(0.5)) and cmp.max_abs == pytest.approx(0.5)


def test_missing_steps_fail_even_when_the_rest_agrees():
    cmp = compare_curves(REF, {1: 5.0, 2: 4.5}, tolerance=1.0)
    assert cmp.missing_steps == [3, 4] and not cmp.within and cmp.first_violation is None
    empty = compare_curves(REF, {}, tolerance=1.0)
    assert empty.steps_compared == 0 and empty.max_abs is None and empty.missing_steps == [1, 2, 3, 4]


def test_nan_or_inf_loss_is_out_of_band():
    cmp = compare_curves(REF, {1: 5.0, 2: float("nan"), 3: 4.0, 4: float("inf")}, tolerance=10.0)
    assert cmp.first_violation[0] == 2 and math.isinf(cmp.max_abs) and not cmp.within


def test_moving_average_window():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]
    noisy = {1: 5.0 + 0.1, 2: 4.5 - 0.1, 3: 4.0 + 0.1, 4: 3.8 - 0.1}  # alternating noise, no drift
    assert not compare_curves(REF, noisy, tolerance=0.05).within
    smoothed = compare_curves(REF, noisy, tolerance=0.05, window=2)
    assert smoothed.within and smoothed.steps_compared == 3  # from the first full window on
    with pytest.raises(ValueError):
        moving_average([1.0], 0)


def test_verdict_of_a_crashed_variant_names_exit_step_and_missing_steps():
    partial = {1: 5.0, 2: 4.5}
    train = compare_curves(REF, partial, tolerance=1e-3)
    passed, reasons = verdict(3, True, train, None, last_step=2)
    assert not passed
    assert reasons[0] == "crashed (exit 3) after step 2"
    assert any("2 reference step(s) missing (3, 4)" in r for r in reasons)
    # a crash fails even if every logged step agreed and none is missing
    assert not verdict(1, True, compare_curves({1: 5.0}, {1: 5.0}, 1e-3), None, last_step=1)[0]
    assert verdict(0, True, compare_curves(REF, REF, 0.0), compare_curves({2: 1.0}, {2: 1.0}, 0.0))[0]
    ok, reasons = verdict(0, False, None, None)
    assert not ok and "its reference did not finish" in reasons[0]
    assert verdict(0, True, compare_curves(REF, REF, 0.0), None, error="resume did not continue") == \
        (False, ["resume did not continue"])


def test_format_steps():
    assert format_steps([3, 4, 5, 9]) == "3-5, 9"
    assert format_steps([10, 20, 30, 40, 50]) == "10-50 every 10"
    assert format_steps([1, 3, 5]) == "1, 3, 5"
    assert format_steps(list(range(1, 40, 2)) + [40]) .endswith(", ...")
    assert format_steps([]) == ""


def _records(train, valid=None, speed=1000.0):
    out = [{"type": "train", "iteration": s, "loss": v, "tokens_per_s": speed + s} for s, v in train.items()]
    return out + [{"type": "eval", "name": "valid", "iteration": s, "loss": v} for s, v in (valid or {}).items()]


def test_curves_speed_and_memory_from_records():
    records = _records({1: 5.0, 2: 4.0, 3: 3.0}, {2: 4.4}) + [{"type": "eval", "name": "test", "iteration": 3,
                                                               "loss": 1.0}]
    train, valid = curves_from_records(records)
    assert train == {1: 5.0, 2: 4.0, 3: 3.0} and valid == {2: 4.4}
    speed, memory = speed_and_memory(records)
    assert speed == 1002.5 and memory is None  # the first record (warm-up) is left out
    assert speed_and_memory([{"type": "train", "iteration": 1, "loss": 1.0, "peak_mem_gib": 3.5}])[1] == 3.5


def test_join_of_a_resume_and_a_resume_that_restarted():
    first = _records({1: 5.0, 2: 4.0, 3: 3.9})  # part 1 ran past resume_at in this fake: cut at 2
    second = _records({3: 3.0, 4: 2.0})
    joined, error = join_resumed(first, second, resume_at=2)
    assert curves_from_records(joined)[0] == {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0} and error is None
    _, error = join_resumed(first, _records({1: 5.0, 2: 4.0, 3: 3.0}), resume_at=2)
    assert "did not continue from the checkpoint" in error


def test_report_of_a_partial_suite_with_a_crashed_variant(tmp_path):
    from convergence_suite.plot import plot_loss_curves

    tol = Tolerance(train_loss=1e-3, valid_loss=1e-3)
    ref_run, good_run, bad_run = Run("ref"), Run("good", reference="ref", tolerance=tol), \
        Run("bad", {"zero_optimization.stage": 1}, reference="ref", tolerance=tol)
    ref = build_entry(ref_run, RunResult("ref", 0, _records(REF, {4: 3.9})), None)
    good = build_entry(good_run, RunResult("good", 0, _records(REF, {4: 3.9})), ref)
    bad = build_entry(bad_run, RunResult("bad", 3, _records({1: 5.0, 2: 4.6})), ref)
    assert good["passed"] and good["status"] == "pass"
    assert not bad["passed"] and bad["status"] == "FAIL" and bad["where"] == "train out of band from step 2"
    entries = [ref, good, bad]
    assert exit_code(entries) == 1 and exit_code([ref, good]) == 0
    header = {"suite": "t", "suite_path": "s.yml", "date": "d", "commit": "c", "exit_code": 1, "pending": 2,
              "tolerance": {"train_loss": 1e-3, "valid_loss": 1e-3, "window": 1}}
    text = render_markdown(header, entries)
    assert "**FAIL: 1/2 variants within tolerance.**" in text and "2 run(s) not finished yet" in text
    assert "- **bad**: crashed (exit 3) after step 2; train loss left the band at step 2" in text
    assert "| bad | ref | FAIL | 2 | 1.00e-01 |" in text
    png = tmp_path / "curves.png"
    plot_loss_curves(str(png), "t", entries, "partial")
    assert png.stat().st_size > 10_000
