"""deepy.py end to end on this CPU machine: dry run, config errors, saved run files, and real launches
(2 gloo ranks through DeepSpeed's runner; 2 simulated srun tasks under deepspeed_slurm)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import yaml

from megatron.launcher.cli import run_forwarding_signals
from megatron.launcher.run_dir import concatenate_original_configs, resolve_run_dir

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ECHO_WORKER = os.path.join("tests", "unit", "launcher", "echo_worker.py")
BASE_CONFIG = ("train_micro_batch_size_per_gpu: 2\n"
               "gradient_accumulation_steps: 1\n"
               "data_path: data/bundled/pystdlib_text_document\n"
               "tokenizer_type: ByteLevelTokenizer\n"
               "lr: 6.0e-4\n")
LAUNCH_TIMEOUT_S = 300  # DeepSpeed's runner and the workers import torch/deepspeed; slow on a busy 2-core box


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra):
    """This environment without Slurm's variables (the tests may run inside a Slurm job), plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.pop("DS_ACCELERATOR", None)
    return {**env, **extra}


def deepy(*args, env=None, timeout=120):
    full_env = clean_env(**(env or {}))
    return subprocess.run([sys.executable, "deepy.py", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def write_configs(tmp_path, extra: str):
    first = tmp_path / "base.yml"
    first.write_text("# my base settings\n" + BASE_CONFIG)
    second = tmp_path / "run.yml"
    second.write_text(extra)
    return first, second


def test_dry_run_prints_resolved_config_and_command_and_starts_nothing(tmp_path):
    base, run = write_configs(tmp_path, f"num_gpus: 2\ntrain_iters: 7\nlog_dir: {tmp_path / 'run'}\n")
    result = deepy("train.py", "base.yml", "run.yml", "--dry-run", "-d", str(tmp_path))
    assert result.returncode == 0, result.stderr
    config_text, command_text = result.stdout.split("# launch command\n")
    resolved = yaml.safe_load(config_text)
    assert resolved["train_iters"] == 7 and resolved["num_gpus"] == 2
    assert resolved["derived"]["world_size"] == 2 and resolved["derived"]["train_batch_size"] == 4
    assert resolved["log_dir"] == str(tmp_path / "run")
    assert "-m deepspeed.launcher.runner --num_gpus 2 --master_port 29500" in command_text
    assert f"train.py --neox_args_file {tmp_path / 'run' / 'neox_args.json'}" in command_text
    assert not (tmp_path / "run").exists()


def test_bad_config_exits_2_with_the_message_only(tmp_path):
    (tmp_path / "bad.yml").write_text(BASE_CONFIG + "hiden_size: 64\n")
    result = deepy("train.py", str(tmp_path / "bad.yml"))
    assert result.returncode == 2
    assert "hiden_size" in result.stderr and "hidden_size" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_launcher_error_exits_2(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    (tmp_path / "mpi.yml").write_text(BASE_CONFIG + f"hostfile: {hostfile}\nlauncher: openmpi\ninclude: localhost:0\n")
    result = deepy("train.py", str(tmp_path / "mpi.yml"), "--dry-run")
    assert result.returncode == 2 and "openmpi cannot select hosts" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_dir_default_and_original_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import datetime

    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    first = resolve_run_dir(None, {}, now)
    assert first == str(tmp_path / "runs" / "20260102-030405")
    os.makedirs(first)
    assert resolve_run_dir(None, {}, now) == first + "-1"
    assert resolve_run_dir(None, {"SLURM_JOB_ID": "77"}) == str(tmp_path / "runs" / "slurm-77")
    assert resolve_run_dir("mine", {}) == str(tmp_path / "mine")

    (tmp_path / "a.yml").write_text("x: 1")
    (tmp_path / "b.yml").write_text("y: 2\n")
    assert concatenate_original_configs(["a.yml", "b.yml"]) == "# --- file: a.yml\nx: 1\n# --- file: b.yml\ny: 2\n"


def test_two_cpu_ranks_through_deepspeed_runner(tmp_path):
    run_dir = tmp_path / "run"
    base, run = write_configs(tmp_path, f"num_gpus: 2\ntrain_iters: 7\nlog_dir: {run_dir}\n"
                                        f"master_port: {free_port()}\n")
    result = deepy(ECHO_WORKER, str(base), str(run), timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reports = [json.loads((run_dir / f"echo_rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["local_rank"] == rank
        assert report["world_size"] == 2 and report["config_world_size"] == 2
        assert report["sum"] == 3.0  # (0 + 1) + (1 + 1)
        assert report["train_iters"] == 7 and report["ds_accelerator"] == "cpu"

    saved = json.loads((run_dir / "neox_args.json").read_text())
    assert saved["train_iters"] == 7 and saved["derived"]["world_size"] == 2 and saved["log_dir"] == str(run_dir)
    assert yaml.safe_load((run_dir / "config.yml").read_text()) == saved
    original = (run_dir / "original_configs.yml").read_text()
    assert original == f"# --- file: {base}\n{base.read_text()}# --- file: {run}\n{run.read_text()}"


def test_exit_status_and_ctrl_c_are_forwarded(tmp_path):
    """The launched command's status comes back; SIGINT to deepy.py reaches the child's process group."""
    assert run_forwarding_signals([sys.executable, "-c", "import sys; sys.exit(3)"], clean_env()) == 3
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert run_forwarding_signals([sys.executable, "-c", killed], clean_env()) == 128 + signal.SIGTERM

    marker = tmp_path / "interrupted"
    child = (f"import signal, sys, time, pathlib\n"
             f"def stop(*_):\n    pathlib.Path({str(marker)!r}).write_text('yes')\n    sys.exit(1)\n"
             f"signal.signal(signal.SIGINT, stop)\n"
             f"pathlib.Path({str(tmp_path / 'ready')!r}).write_text('')\n"
             f"time.sleep(60)\n")

    def interrupt_when_ready():
        deadline = time.time() + 30
        while not (tmp_path / "ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C does to deepy.py

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    started = time.time()
    assert run_forwarding_signals([sys.executable, "-c", child], clean_env()) == 130  # failed after Ctrl-C
    assert marker.read_text() == "yes" and time.time() - started < 30
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler was removed


def test_deepspeed_slurm_tasks_become_ranks(tmp_path):
    """Two deepy.py processes with the variables srun sets: each execs the worker as its rank."""
    run_dir = tmp_path / "run"
    base, run = write_configs(tmp_path, f"deepspeed_slurm: true\nlog_dir: {run_dir}\nmaster_port: {free_port()}\n")
    procs = []
    for rank in (0, 1):
        task_env = clean_env(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_PROCID=str(rank),
                             SLURM_LOCALID=str(rank))
        procs.append(subprocess.Popen([sys.executable, "deepy.py", ECHO_WORKER, str(base), str(run)], cwd=REPO,
                                      env=task_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs

    reports = [json.loads((run_dir / f"echo_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and [r["local_rank"] for r in reports] == [0, 1]
    assert [r["world_size"] for r in reports] == [2, 2] and [r["sum"] for r in reports] == [3.0, 3.0]
    assert reports[1]["config_world_size"] == 2  # from SLURM_NTASKS, not from the (absent) num_gpus
    assert (run_dir / "neox_args.json").exists()  # written by task 0 only
    assert "run directory" in outputs[0] and "run directory" not in outputs[1]
