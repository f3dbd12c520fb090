"""Fault handling on the GPU (NCCL, with the gloo side group for host-side flags, mpu/checks.py): a bf16
run that diverges stops with the divergence message; SIGTERM saves after the current step and the resumed
run continues from it. Run on the GPU machine: `python -m pytest -m gpu tests/gpu/test_gpu_robust.py -q`."""

import re
import signal
import subprocess

import pytest
import torch

from tests.e2e.harness import deepy_command, losses, read_metrics, run_deepy, write_config
from tests.e2e.test_robust_e2e import DIVERGING, _wait_for_records, assert_one_clean_message, run_failing

pytestmark = pytest.mark.gpu

BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
        "log_interval": 5}


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them with -m gpu on the GPU machine)")


def test_bf16_divergence_stops_on_the_gpu(tmp_path):
    proc, _ = run_failing(tmp_path, "nan", {**DIVERGING, **BF16, "train_iters": 60})
    assert_one_clean_message(proc, "train.py: error: training diverged")


def test_sigterm_saves_and_resumes_on_the_gpu(tmp_path):
    save = tmp_path / "ckpt"
    path, config = write_config(tmp_path, "long", {**BF16, "train_iters": 100000, "save": str(save)})
    proc = subprocess.Popen(**deepy_command(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_records(config["log_dir"], 2, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    match = re.search(r"stopped by SIGTERM after step (\d+) of 100000; saved checkpoint", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert (save / "latest").read_text().strip() == f"global_step{step}"
    first = losses(read_metrics(config["log_dir"], "train"))
    resumed = losses(run_deepy(tmp_path, "resumed", {**BF16, "train_iters": step + 10, "load": str(save),
                                                      "save": str(save)}))
    assert min(resumed) > step and max(resumed) == step + 10
    assert resumed[max(resumed)] < first[min(first)]  # it goes on training the same model
