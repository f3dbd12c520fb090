"""tools/convergence.py end to end with a fake trainer in place of deepy.py (fast): exit 0 when every
variant agrees, 1 when one does not (wrong learning rate, crash, missing steps, a resume that restarts),
2 on usage, suite and config errors; the report, results.json and PNG of a suite with a crashed variant;
progress lines; --only/--skip/--reuse; the resume variant's two launches."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

FAKE_TRAINER = '''
import json, os, sys, yaml
config = yaml.safe_load(open(sys.argv[-1]))
lr = config["optimizer"]["params"]["lr"]
start = 1
if config.get("load"):
    start = int(open(os.path.join(config["load"], "latest")).read()) + 1
os.makedirs(config["log_dir"], exist_ok=True)
with open(os.path.join(config["log_dir"], "metrics.jsonl"), "w") as out:
    for step in range(start, config["train_iters"] + 1):
        if config["seed"] == 666 and step == 3:
            print("worker 0 died", flush=True)
            sys.exit(3)
        if config["seed"] == 777 and step == 2:
            import time
            time.sleep(60)  # hangs: --timeout must end it
        loss = 6.0 - 0.1 * step * lr / 1.0e-3
        if step % config["log_interval"] == 0:
            print(f"iter {step}/{config['train_iters']} | loss {loss:.4f}", flush=True)
            out.write(json.dumps({"type": "train", "iteration": step, "loss": loss, "tokens_per_s": 100.0}) + "\\n")
            out.flush()  # as the real logger: a killed run keeps what it logged
        if step % config["eval_interval"] == 0 or step == config["train_iters"]:
            out.write(json.dumps({"type": "eval", "name": "valid", "iteration": step, "loss": loss + 0.1}) + "\\n")
if config.get("save"):
    os.makedirs(config["save"], exist_ok=True)
    open(os.path.join(config["save"], "latest"), "w").write(str(config["train_iters"]))
'''


def _tool():
    spec = importlib.util.spec_from_file_location("convergence_cli", os.path.join(REPO, "tools", "convergence.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def harness(tmp_path, monkeypatch):
    """(run(argv) -> exit code, suite path): the CLI with the fake trainer launched instead of deepy.py."""
    tool = _tool()
    import convergence_suite.runner as runner

    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "LAUNCH", (str(fake),))
    monkeypatch.chdir(REPO)  # main() changes into the repository; restored after the test
    suite = tmp_path / "suite.yml"
    suite.write_text(textwrap.dedent("""\
        configs: [configs/tiny.yml]
        set: {train_iters: 6, eval_interval: 3, log_interval: 1, optimizer.params.lr: 1.0e-3}
        tolerance: {train_loss: 1.0e-6}
        references: [{name: ref}]
        variants:
          - name: same
            set: {zero_optimization.stage: 1}
          - name: resume
            resume_at: 3
        """))
    return (lambda *argv: tool.main([str(suite), "--out", str(tmp_path / "out"), *argv])), tmp_path


def _results(tmp_path):
    return {run["name"]: run for run in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]}


def test_equivalent_suite_passes_and_writes_everything(harness, capsys):
    run, tmp_path = harness
    assert run() == 0
    out = tmp_path / "out"
    assert (out / "loss_curves.png").stat().st_size > 10_000
    results = _results(tmp_path)
    assert [results[n]["status"] for n in ("ref", "same", "resume")] == ["reference", "pass", "pass"]
    assert results["same"]["train_cmp"]["steps_compared"] == 6 and results["same"]["valid_cmp"]["steps_compared"] == 2
    report = (out / "report.md").read_text()
    assert "**PASS: 2/2 variants within tolerance.**" in report and "loss_curves.png" in report
    # the resume variant: part 1 to step 3 saving a checkpoint, part 2 loading it, LR schedule pinned
    part1 = yaml.safe_load((out / "runs" / "resume" / "config_part1.yml").read_text())
    part2 = yaml.safe_load((out / "runs" / "resume" / "config_part2.yml").read_text())
    assert part1["train_iters"] == 3 and part1["save"] and part1["lr_decay_iters"] == 6
    assert part2["train_iters"] == 6 and part2["load"] == part1["save"] and part2["lr_decay_iters"] == 6
    assert sorted(int(k) for k in results["resume"]["train"]) == [1, 2, 3, 4, 5, 6]
    # every run: no checkpoint of its own, the harness's log dir
    ref = yaml.safe_load((out / "runs" / "ref" / "config.yml").read_text())
    assert ref["save"] is None and ref["load"] is None and ref["log_dir"] == str(out / "runs" / "ref" / "log")
    printed = capsys.readouterr().out
    assert "[convergence] [2/3] same: step 4/6 loss 5.6000" in printed
    assert "[convergence] same vs ref: pass" in printed


def test_non_equivalent_crashed_and_sparse_variants_exit_1(harness, capsys):
    run, tmp_path = harness
    code = run("--variant", "lr3x: optimizer.params.lr=3e-3", "--variant", "crash: seed=666",
               "--variant", "sparse: log_interval=2", "--skip", "resume")
    assert code == 1
    results = _results(tmp_path)
    assert results["same"]["status"] == "pass" and "resume" not in results
    assert results["lr3x"]["status"] == "FAIL" and results["lr3x"]["train_cmp"]["first_violation"][0] == 1
    crash = results["crash"]
    assert crash["status"] == "FAIL" and crash["returncode"] == 3 and crash["last_step"] == 2
    assert crash["reasons"][0] == "crashed (exit 3) after step 2"
    assert "reference step(s) missing (1, 3, 5)" in " ".join(results["sparse"]["reasons"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**FAIL: 1/4 variants within tolerance.**" in report
    assert "- **lr3x**: train loss left the band at step 1" in report
    assert "worker 0 died" in capsys.readouterr().out  # the crashed run's last lines are shown


def test_a_hanging_run_is_killed_after_the_timeout(harness, capsys):
    run, tmp_path = harness
    assert run("--only", "same", "--variant", "hang: seed=777", "--only", "hang", "--timeout", "3") == 1
    hang = _results(tmp_path)["hang"]
    assert hang["returncode"] == 124 and hang["last_step"] == 1 and hang["seconds"] < 30
    assert "killed after 3s (--timeout)" in capsys.readouterr().out


def test_reuse_runs_only_what_changed(harness, capsys):
    run, tmp_path = harness
    assert run("--skip", "resume") == 0
    capsys.readouterr()
    assert run("--skip", "resume", "--reuse", "--variant", "lr3x: optimizer.params.lr=2e-3") == 1
    printed = capsys.readouterr().out
    assert "ref: reused the finished run" in printed and "same: reused the finished run" in printed
    assert "lr3x: start" in printed
    assert run("--skip", "resume", "--reuse", "--set", "train_iters=5") == 0  # a changed config runs again
    assert "reused" not in capsys.readouterr().out


def test_a_resume_that_restarts_from_scratch_fails(harness, monkeypatch):
    run, tmp_path = harness
    import convergence_suite.runner as runner

    original = runner.part_configs

    def forgetful(suite, run_, run_dir):  # part 2 without `load`: it starts again at step 1
        parts = original(suite, run_, run_dir)
        return [(label, {**config, "load": None}) for label, config in parts]

    monkeypatch.setattr(runner, "part_configs", forgetful)
    assert run("--only", "resume") == 1
    assert "did not continue from the checkpoint" in " ".join(_results(tmp_path)["resume"]["reasons"])


@pytest.mark.parametrize("argv, message", [
    (["--variant", "bad name: seed=1"], "expected \"name: key=value"),
    (["--variant", "x: seed"], "expected key=value"),
    (["--only", "nope"], "--only nope: no such variant"),
    (["--variant", "x: no_such_key=1"], "the config of run x is not valid"),
    (["--variant", "x: resume_at=6"], "resume_at 6 must be in [1, train_iters 6)"),
    (["--variant", "x: save=/tmp/x"], "are set by the harness"),
    (["--variant", "x: reference=other"], "reference 'other' is not one of the suite's references"),
    (["--variant", "same: seed=2"], "run names must differ"),
])
def test_usage_and_config_errors_exit_2(harness, capsys, argv, message):
    run, tmp_path = harness
    assert run(*argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()  # nothing ran


@pytest.mark.parametrize("text, message", [
    ("configs: [configs/tiny.yml]\ntolerance: {train_loss: 1e-6}\nreferences: [{name: r}]\nvariant: []\n",
     "unknown key(s) ['variant']"),
    ("configs: [configs/tiny.yml]\nreferences: [{name: r}]\n", "tolerance: missing"),
    ("configs: [configs/nope.yml]\ntolerance: {train_loss: 1e-6}\nreferences: [{name: r}]\n", "does not exist"),
    ("configs: [configs/tiny.yml]\ntolerance: {train_loss: -1}\nreferences: [{name: r}]\n", "must be a number >= 0"),
    ("configs: [configs/tiny.yml]\ntolerance: {train_loss: 1e-6}\nreferences: [{name: r, resume_at: 2}]\n",
     "belongs to variants"),
    ("configs: [configs/tiny.yml, configs/tiny.yml]\ntolerance: {train_loss: 1e-6}\nreferences: [{name: r}]\n",
     "is set in both"),
])
def test_suite_file_errors_exit_2(harness, capsys, text, message):
    run, tmp_path = harness
    (tmp_path / "suite.yml").write_text(text)
    assert run() == 2
    assert message in capsys.readouterr().err


def test_shipped_suites_load_and_their_configs_validate():
    """Every configs/convergence/*.yml parses, starts with its documentation, and each run's config is valid."""
    tool = _tool()
    from convergence_suite.runner import Runner
    from convergence_suite.suite import load_suite

    directory = os.path.join(REPO, "configs", "convergence")
    suites = sorted(f for f in os.listdir(directory) if f.endswith(".yml"))
    assert "cpu-tiny.yml" in suites and len(suites) >= 4
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for name in suites:
            suite = load_suite(os.path.join(directory, name), REPO)
            assert suite.variants, name
            with open(os.path.join(directory, name)) as handle:
                assert handle.readline().startswith("#"), f"{name} must start with its documentation"
            tool.validate_configs(suite, Runner("/tmp/unused", REPO))
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
