"""Faults during a run through deepy.py (issue 13): divergence stops the run and keeps the good checkpoint
(fp32 and bf16), SIGTERM saves and the resume is exact, a damaged checkpoint is refused with one message
(no traceback, no base64 wall), and `kill -9` of deepy.py takes its workers with it."""

import json
import math
import os
import re
import signal
import subprocess
import time

import psutil
import torch

from megatron.checkpointing import read_model_state
from tests.e2e.harness import deepy_command, losses, read_metrics, run_deepy, write_config

DIVERGING = {"optimizer": {"type": "AdamW", "params": {"lr": 1.0e6, "betas": [0.9, 0.95], "eps": 1.0e-8}},
             "train_iters": 30, "max_consecutive_nonfinite_steps": 3}


def run_failing(tmp_path, name, overrides, timeout=300):
    path, config = write_config(tmp_path, name, overrides)
    proc = subprocess.run(**deepy_command(path), capture_output=True, text=True, timeout=timeout)
    return proc, config


def assert_one_clean_message(proc, needle):
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert output.count(needle) == 1, output[-4000:]  # printed once (rank 0)
    assert "Traceback" not in output, output[-4000:]
    assert max(len(word) for word in output.split()) < 400, "a wall of base64 in the output"


def test_divergence_stops_and_pruning_keeps_the_good_checkpoint(tmp_path):
    """Today: NaN loss from step 2 on, `skipped_steps 0`, NaN checkpoints saved (keep_last_n_checkpoints
    pruned the good ones), rc 0."""
    save = tmp_path / "ckpt"
    proc, config = run_failing(tmp_path, "nan", {**DIVERGING, "save": str(save), "checkpoint_factor": 1,
                                                 "keep_last_n_checkpoints": 1})
    assert_one_clean_message(proc, "train.py: error: training diverged")
    match = re.search(r"in a row up to step (\d+) .* the last good checkpoint is (\S+)/(global_step\d+)", proc.stderr)
    assert match, proc.stderr[-3000:]
    stop_step, good = int(match.group(1)), match.group(3)
    assert stop_step < config["train_iters"]
    assert (save / "latest").read_text().strip() == good and (save / good / "complete").is_file()
    state, _ = read_model_state(str(save))
    assert all(torch.isfinite(tensor).all() for tensor in state.values())
    records = read_metrics(config["log_dir"], "train")
    assert records[-1]["skipped_steps"] >= 3 and not math.isfinite(records[-1]["loss"])


def test_bf16_divergence_stops(tmp_path):
    """Today: bf16 + NaN counts the steps as skipped forever and never stops."""
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
    proc, _ = run_failing(tmp_path, "bf16_nan", {**DIVERGING, **bf16})
    assert_one_clean_message(proc, "train.py: error: training diverged")
    assert "no checkpoint of this run was saved" in proc.stderr


def _wait_for_records(log_dir, count, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            if len(read_metrics(log_dir, "train")) >= count:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError("the run logged too few steps in time")


def test_sigterm_saves_resume_is_exact_and_a_damaged_checkpoint_is_refused(tmp_path):
    """Today: SIGTERM exits at once and everything since the last save is lost; 4 KB of garbage in the model
    file loads silently."""
    save = tmp_path / "ckpt"
    path, config = write_config(tmp_path, "long", {"train_iters": 1000, "save": str(save)})
    proc = subprocess.Popen(**deepy_command(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_records(config["log_dir"], 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-3000:]
    match = re.search(r"stopped by SIGTERM after step (\d+) of 1000; saved checkpoint", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert (save / "latest").read_text().strip() == f"global_step{step}"
    assert max(losses(read_metrics(config["log_dir"], "train"))) == step  # the step it was in was finished

    full = losses(run_deepy(tmp_path, "full", {"train_iters": step + 2}))
    resumed = losses(run_deepy(tmp_path, "resumed", {"train_iters": step + 2, "load": str(save), "save": str(save)}))
    assert sorted(resumed) == [step + 1, step + 2]
    for it in resumed:
        assert resumed[it] == full[it], (it, resumed[it], full[it])  # bitwise

    weights = save / f"global_step{step + 2}" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = os.urandom(4096)
    weights.write_bytes(bytes(data))
    proc, _ = run_failing(tmp_path, "damaged", {"train_iters": step + 4, "load": str(save), "save": str(save)})
    assert_one_clean_message(proc, "train.py: error: load: checkpoint")
    assert str(weights) in proc.stderr and f"global_step{step}" in proc.stderr, proc.stderr[-3000:]
    assert (save / "latest").read_text().strip() == f"global_step{step + 2}"  # nothing moved


def _job_processes(marker: str) -> list:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_kill_9_of_deepy_stops_the_workers_after_a_save(tmp_path):
    """Today: runner, launcher and workers go on as orphans, holding the port."""
    save = tmp_path / "ckpt"
    path, config = write_config(tmp_path, "orphans", {"train_iters": 1000, "save": str(save)})
    proc = subprocess.Popen(**deepy_command(path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_records(config["log_dir"], 2, proc)
    marker = os.path.join(config["log_dir"], "neox_args.json")
    assert _job_processes(marker), "no worker found"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 120
    while _job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _job_processes(marker)
    for process in left:
        process.kill()
    assert not left, f"orphans: {[p.pid for p in left]}"
    assert (save / "latest").is_file()  # the reaper's SIGTERM let the workers save


def test_second_run_into_a_busy_save_dir_fails_before_any_worker(tmp_path):
    """Today: no lock; the second run deleted the first one's partial save and the first died."""
    from megatron.checkpointing.lock import SaveDirLock

    save = tmp_path / "ckpt"
    with SaveDirLock(str(save)):
        start = time.monotonic()
        proc, _ = run_failing(tmp_path, "second", {"save": str(save), "load": str(save)})
        assert time.monotonic() - start < 60
    assert proc.returncode == 2 and "is in use by another run" in proc.stderr, proc.stderr[-2000:]
    assert "launching" not in proc.stdout


def test_data_beyond_the_tokenizers_vocabulary_is_one_message(tmp_path):
    """Today: `IndexError: index out of range in self`, 68 lines from the embedding."""
    import numpy as np

    from megatron.data.indexed_dataset import IndexedDatasetBuilder, index_file_path

    prefix = str(tmp_path / "wide_ids")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(64):
        builder.add_item(rng.integers(0, 300, size=200))  # the byte-level tokenizer has 257 ids
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    proc, _ = run_failing(tmp_path, "wide", {"data_path": prefix, "train_iters": 2})
    assert_one_clean_message(proc, "train.py: error: ")
    assert f"{prefix}.bin holds token id 299" in proc.stderr and "257 ids" in proc.stderr, proc.stderr[-2000:]
