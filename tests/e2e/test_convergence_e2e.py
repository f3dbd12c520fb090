"""tools/convergence.py on the CPU suite for real (deepy.py, gloo ranks, fp32): every variant of
configs/convergence/cpu-tiny.yml agrees with its reference within the suite's tolerance (exit 0), and the
same suite with a variant that is not equivalent (3x the learning rate) exits 1 with that variant, and only
it, out of the band."""

import json
import os
import subprocess
import sys

from tests.e2e.harness import REPO_ROOT

SUITE = "configs/convergence/cpu-tiny.yml"


def _run(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/convergence.py", SUITE, "--out", str(out), *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    results = {}
    if (out / "results.json").exists():
        results = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    return proc, results


def test_cpu_suite_passes_and_a_3x_learning_rate_fails(tmp_path):
    out = tmp_path / "suite"
    proc, results = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    expected = {"zero1", "zero2", "zero3", "tp2", "tp2_sp", "pp2", "pp2_tp2", "pp2_tied", "grad_accum", "resume"}
    variants = {name for name, run in results.items() if not run["is_reference"]}
    assert variants == expected
    for name in variants:
        run = results[name]
        assert run["status"] == "pass" and run["train_cmp"]["steps_compared"] == 24, (name, run["reasons"])
        assert run["valid_cmp"]["steps_compared"] == 4, name
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert "**PASS:" in (out / "report.md").read_text()

    # the same suite, finished runs reused, plus a learning rate 3x the suite's: exit 1, that variant out of band
    proc, results = _run(out, "--reuse", "--variant", "lr3x: optimizer.params.lr=9.0e-3")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert results["lr3x"]["status"] == "FAIL" and results["lr3x"]["train_cmp"]["first_violation"] is not None
    assert all(run["passed"] for name, run in results.items() if name != "lr3x")
    assert sum(run["reused"] for run in results.values()) == len(results) - 1
    assert "- **lr3x**: train loss left the band at step" in (out / "report.md").read_text()
