"""tools/bench/bench_throughput.py end to end on CPU: ours and the eager baseline on the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
SCRIPT = os.path.join(ROOT, "tools", "bench", "bench_throughput.py")
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))


def _cpu_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--sizes", "tiny", "--seq", "64", "--micro-batch", "2",
         "--grad-accum", "2", "--steps", "2", "--warmup", "1", "--baselines", "eager", "--out", str(out), "--markdown", "--profile",
         "--variant", "fused: fused_cross_entropy=true", "--variant", "plain: fused_cross_entropy=false",
         "--cache-dir", str(tmp / "cache")],
        cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_json_has_positive_throughput_and_consistent_ratio(tiny_results):
    results, _ = tiny_results
    runs = {run["impl"]: run for run in results["runs"]}
    assert set(runs) == {"ours", "eager"}
    for run in runs.values():
        assert run["status"] == "ok", run
        assert run["tokens_per_s"] > 0 and run["median_step_s"] > 0
        assert len(run["step_times_s"]) == 2
        assert run["tokens_per_step"] == 2 * 64 * 2  # micro-batch x seq x grad-accum, on both sides
        assert run["tokens_per_s"] == pytest.approx(run["tokens_per_step"] / run["median_step_s"])
        assert run["mfu"] is None  # CPU: peak unknown
    assert runs["ours"]["ratio_vs_eager"] == pytest.approx(runs["ours"]["tokens_per_s"] / runs["eager"]["tokens_per_s"])
    assert runs["eager"]["ratio_vs_eager"] == pytest.approx(1.0)
    assert runs["ours"]["flops_per_token"] == runs["eager"]["flops_per_token"] > 0
    assert "zero0" in runs["ours"]["notes"] and "grad-acc 2" in runs["ours"]["notes"]
    assert results["meta"]["seq"] == 64 and results["meta"]["env"]["device_name"] == "cpu"


def test_output_has_formula_table_and_markdown(tiny_results):
    _, stdout = tiny_results
    assert "FLOPs/token = 6*N + 12*L*h*s" in stdout
    assert "median of 2 timed steps (run back to back, each timed by CUDA events on the stream)" in stdout
    assert "ours (DeepSpeed + Trainer)" in stdout and "HF GPTNeoX eager" in stdout
    assert "| tiny | ours (DeepSpeed + Trainer) [fused] |" in stdout


def test_a_failing_worker_is_reported_not_raised(tmp_path):
    from bench_throughput import run_worker

    spec = {"size": "tiny", "impl": "ours", "device": "cpu", "seq": 64, "micro_batch": 2, "steps": 1, "warmup": 0,
            "overrides": {"num_layers": "not a number"}, "data_prefix": str(tmp_path / "missing"),
            "cache_dir": str(tmp_path)}
    result = run_worker(spec, str(tmp_path), timeout=120)
    assert result["status"] == "FAILED"
    assert "num_layers" in result["error"]


def test_profile_reports_phases_of_our_step(tiny_results):
    """--profile adds the operator table and, for ours, the forward/backward/step spans per micro-batch."""
    results, stdout = tiny_results
    ours = next(run for run in results["runs"] if run["impl"] == "ours")
    assert set(ours["phases_ms"]) == {"forward", "backward", "step"}
    assert all(times["host_ms"] > 0 and times["gpu_ms"] is None for times in ours["phases_ms"].values())
    assert "phases per micro-batch" in stdout and "--- profile:" in stdout
    assert "host time per step:" in stdout and " ms own " in ours["host_profile"]


def test_variants_run_ours_once_each_with_their_overrides(tiny_results):
    results, stdout = tiny_results
    ours = [run for run in results["runs"] if run["impl"] == "ours"]
    assert [run["variant"] for run in ours] == ["fused", "plain"]
    assert all(run["status"] == "ok" and run["ratio_vs_eager"] > 0 for run in ours)
    assert results["meta"]["variants"] == {"fused": {"fused_cross_entropy": True},
                                           "plain": {"fused_cross_entropy": False}}
    assert "ours (DeepSpeed + Trainer) [fused]" in stdout and "ours (DeepSpeed + Trainer) [plain]" in stdout


def test_bad_variant_is_a_usage_error():
    from bench_throughput import parse_variants

    assert parse_variants([]) == [(None, {})]
    with pytest.raises(ValueError, match="name of letters"):
        parse_variants(["no colon here"])
    with pytest.raises(ValueError, match="must differ"):
        parse_variants(["a: torch_compile=true", "a:"])


def test_measure_rejects_an_unknown_timing():
    from bench_timing import measure

    calls = []
    with pytest.raises(ValueError, match="timing must be one of"):
        measure(lambda: calls.append(1), 0, 1, "cpu", timing="wallclock")
    assert calls == []


@pytest.mark.parametrize("timing", ["events", "synchronized"])
def test_measure_times_each_step_on_cpu(timing):
    import time

    from bench_timing import measure

    calls = []
    result = measure(lambda: (calls.append(1), time.sleep(0.01)), 2, 3, "cpu", timing=timing)
    assert len(calls) == 5 and len(result["step_times_s"]) == 3
    assert all(t >= 0.01 for t in result["step_times_s"])
