"""Training the runs of a suite through deepy.py, one after the other, with progress on the console.

Each run gets `<out>/runs/<name>/`: `config.yml` (the merged config deepy.py reads), `log/metrics.jsonl`
(and deepy's run files), `output.log` (everything the launcher and workers printed) and `run.json` (exit
status, seconds, the configs run). A resume variant trains in two parts: `config_part1.yml` to step k
with `save` in `ckpt/` and the full run's LR schedule (lr_decay_iters pinned), then `config_part2.yml` to
the end with `load` from it; its curve is part 1's steps <= k joined with part 2's steps > k.
A crash (non-zero exit, or a timeout) is recorded in the result and the suite goes on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml

from convergence_suite.suite import Run, Suite, SuiteError

ITER_LINE = re.compile(r"^iter (\d+)/(\d+) \| loss (\S+)")
EVAL_LINE = re.compile(r"^eval (\S+) iter (\d+) \| loss (\S+)")
TAIL_LINES = 30
LAUNCH = ("deepy.py", "train.py")  # run by `python` in the repository root, followed by the config file


@dataclass
class RunResult:
    name: str
    returncode: Optional[int]  # None: not run
    records: list = field(default_factory=list)  # metrics.jsonl records (a resume: both parts, joined)
    seconds: float = 0.0
    error: Optional[str] = None  # a harness-level failure (e.g. the resume did not continue)
    run_dir: str = ""
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None

    @property
    def last_step(self) -> Optional[int]:
        steps = [r["iteration"] for r in self.records if r.get("type") == "train"]
        return max(steps) if steps else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def decay_iters(config: dict) -> int:
    """The run's lr_decay_iters as the config loader derives it (lr_decay_iters, else train_iters)."""
    value = config.get("lr_decay_iters")
    return int(value if value is not None else config.get("train_iters", 100))


def part_configs(suite: Suite, run: Run, run_dir: str) -> list:
    """[(label, config)] of the launches of `run`: one, or two for a resume variant (module docstring).
    The harness's own keys (log_dir, save, load, finetune) are set here; master_port at launch."""
    config = suite.run_config(run)
    owned = {"save": None, "load": None, "finetune": False}
    if run.resume_at is None:
        return [("", {**config, **owned, "log_dir": os.path.join(run_dir, "log")})]
    total = int(config.get("train_iters", 100))
    if not 1 <= run.resume_at < total:
        raise SuiteError(f"{suite.path}: variant {run.name}: resume_at {run.resume_at} must be in [1, train_iters "
                         f"{total}) so that the run stops and resumes before the end.")
    ckpt = os.path.join(run_dir, "ckpt")
    pinned = {"lr_decay_iters": decay_iters(config)}
    first = {**config, **owned, **pinned, "train_iters": run.resume_at, "save": ckpt,
             "log_dir": os.path.join(run_dir, "log_part1")}
    second = {**config, **owned, **pinned, "load": ckpt, "log_dir": os.path.join(run_dir, "log_part2")}
    return [("part1", first), ("part2", second)]


def read_records(log_dir: str) -> list:
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    pass
    return records


def join_resumed(first: list, second: list, resume_at: int) -> tuple:
    """(records, error): part 1's records up to step `resume_at`, then part 2's after it. Part 2 must
    continue after `resume_at` (a run that logged steps <= resume_at started afresh: not a resume)."""
    head = [r for r in first if int(r.get("iteration", 0)) <= resume_at]
    tail = [r for r in second if int(r.get("iteration", 0)) > resume_at]
    restarted = sorted({int(r["iteration"]) for r in second if r.get("type") == "train"
                        and int(r["iteration"]) <= resume_at})
    error = None
    if restarted:
        error = (f"the resumed part logged step {restarted[0]} <= resume_at {resume_at}: it did not continue from "
                 f"the checkpoint")
    return head + tail, error


class Runner:
    """Launches runs; `progress(line)` receives one line per event (run start/end, each logged step)."""

    def __init__(self, out_dir: str, repo_root: str, progress: Callable[[str], None] = print,
                 timeout: Optional[float] = None, reuse: bool = False, python: str = sys.executable):
        self.out_dir, self.repo_root = out_dir, repo_root
        self.progress, self.timeout, self.reuse, self.python = progress, timeout, reuse, python

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.out_dir, "runs", run.name)

    def execute(self, suite: Suite, run: Run, label: str) -> RunResult:
        run_dir = self.run_dir(run)
        parts = part_configs(suite, run, run_dir)
        reused = self._reused(run, run_dir, parts)
        if reused is not None:
            self.progress(f"{label} {run.name}: reused the finished run in {run_dir}")
            return reused
        os.makedirs(run_dir, exist_ok=True)
        start = time.monotonic()
        returncode, records_by_part = 0, []
        for part, config in parts:
            name = run.name + (f" ({part})" if part else "")
            returncode = self._launch(config, run_dir, part, f"{label} {name}")
            records_by_part.append(read_records(config["log_dir"]))
            if returncode != 0:
                break
        error = None
        if run.resume_at is not None and len(records_by_part) == 2:
            records, error = join_resumed(records_by_part[0], records_by_part[1], run.resume_at)
        else:
            records = records_by_part[0]
            if run.resume_at is not None:  # part 1 failed: keep what it logged
                records = [r for r in records if int(r.get("iteration", 0)) <= run.resume_at]
        result = RunResult(run.name, returncode, records, time.monotonic() - start, error, run_dir)
        with open(os.path.join(run_dir, "run.json"), "w") as handle:
            json.dump({"returncode": returncode, "error": error, "seconds": result.seconds,
                       "configs": [config for _, config in parts]}, handle, indent=1, default=str)
        status = "finished" if result.ok else f"FAILED (exit {returncode}{'; ' + error if error else ''})"
        self.progress(f"{label} {run.name}: {status} in {result.seconds:.0f}s, last step {result.last_step}")
        return result

    def _reused(self, run: Run, run_dir: str, parts: list) -> Optional[RunResult]:
        """With --reuse: the earlier result of the same configs, if it finished."""
        path = os.path.join(run_dir, "run.json")
        if not self.reuse or not os.path.isfile(path):
            return None
        with open(path) as handle:
            saved = json.load(handle)
        wanted = json.loads(json.dumps([config for _, config in parts], default=str))
        if saved.get("returncode") != 0 or saved.get("error") or saved.get("configs") != wanted:
            return None
        logs = [read_records(config["log_dir"]) for _, config in parts]
        records = join_resumed(logs[0], logs[1], run.resume_at)[0] if len(logs) == 2 else logs[0]
        return RunResult(run.name, 0, records, saved.get("seconds", 0.0), None, run_dir, reused=True)

    def _launch(self, config: dict, run_dir: str, part: str, label: str) -> int:
        """One `python deepy.py train.py <config>`; returns its exit status (124 on timeout)."""
        suffix = f"_{part}" if part else ""
        config_path = os.path.join(run_dir, f"config{suffix}.yml")
        with open(config_path, "w") as handle:
            yaml.safe_dump({**config, "master_port": free_port()}, handle, sort_keys=False)
        if os.path.isdir(config["log_dir"]):  # a fresh metrics.jsonl for this launch
            metrics = os.path.join(config["log_dir"], "metrics.jsonl")
            if os.path.exists(metrics):
                os.remove(metrics)
        self.progress(f"{label}: start ({os.path.relpath(config_path, self.out_dir)})")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        tail: list = []
        timed_out = threading.Event()
        with open(os.path.join(run_dir, f"output{suffix}.log"), "w") as log:
            proc = subprocess.Popen([self.python, *LAUNCH, config_path], cwd=self.repo_root,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            timer = None
            if self.timeout is not None:
                timer = threading.Timer(self.timeout, lambda: (timed_out.set(), self._kill(proc)))
                timer.start()
            try:
                for line in proc.stdout:
                    log.write(line)
                    tail = (tail + [line.rstrip()])[-TAIL_LINES:]
                    self._report(line.strip(), label)
                returncode = proc.wait()
            except BaseException:
                self._kill(proc)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
        if timed_out.is_set():
            self.progress(f"{label}: killed after {self.timeout:.0f}s (--timeout)")
            return 124
        if returncode != 0:
            self.progress(f"{label}: exit {returncode}; last lines of its output:\n    " + "\n    ".join(tail))
        return returncode

    def _report(self, line: str, label: str) -> None:
        match = ITER_LINE.match(line)
        if match:
            step, total, loss = match.groups()
            self.progress(f"{label}: step {step}/{total} loss {loss}")
            return
        match = EVAL_LINE.match(line)
        if match:
            split, step, loss = match.groups()
            self.progress(f"{label}: step {step} {split} loss {loss}")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """End the launcher and its workers (the process group this runner started for it)."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
