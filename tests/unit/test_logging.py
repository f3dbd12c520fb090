"""MetricsLogger sinks (console, metrics.jsonl, TensorBoard, W&B) and the human formatting helpers."""

import io
import json
import os
import sys
import types

import pytest

from megatron.logging import MetricsLogger, format_count, format_duration, format_number, format_train_line
from megatron.neox_args.sections import LoggingArgs
from megatron.training.metrics import ThroughputStats


def stats(**overrides):
    values = dict(iteration=120, step_time_s=0.41, tokens_per_s=41_200.0, tflops_per_device=112.5, mfu=0.381,
                  eta_s=362.0, elapsed_s=49.2)
    values.update(overrides)
    return ThroughputStats(**values)


@pytest.mark.parametrize(
    "value, text",
    [(950, "950"), (41_200, "41.2k"), (3_100_000, "3.10M"), (2e9, "2.00G"), (9_999, "10.00k")],
)
def test_format_count(value, text):
    assert format_count(value) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(0.41, "0.41s"), (12.34, "12.3s"), (362, "6m02s"), (7384, "2h03m"), (2 * 86400 + 60, "2d00h"), (None, "n/a")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_number():
    assert format_number(0.125) == "0.125"
    assert format_number(1.5e-5) == "1.50e-05"
    assert format_number(65536.0) == "6.554e+04"


def test_console_line_matches_documented_format():
    values = dict(loss=3.4123, lr=5.8e-4, grad_norm=0.912, tokens_per_s=41_200.0, tflops_per_device=112.5,
                  mfu=0.381, step_time_s=0.41, eta_s=362.0, elapsed_s=10.0)
    line = format_train_line(120, 1000, values)
    assert line == ("iter 120/1000 | loss 3.412 | lr 5.8e-04 | grad_norm 0.91 | tok/s 41.2k | TFLOP/s 112.5 | "
                    "MFU 38.1% | step 0.41s | ETA 6m02s")
    values.update(mfu_causal=0.31, tflops_per_device_causal=91.6)
    line = format_train_line(120, 1000, values)
    assert line == ("iter 120/1000 | loss 3.412 | lr 5.8e-04 | grad_norm 0.91 | tok/s 41.2k | TFLOP/s 112.5 | "
                    "MFU 38.1% | causal MFU 31.0% | step 0.41s | ETA 6m02s")


def test_console_line_without_peak_and_with_extras():
    line = format_train_line(5, None, dict(loss=2.0, lr=1e-3, tokens_per_s=900.0, tflops_per_device=0.0125,
                                           mfu=None, step_time_s=1.0, eta_s=None, loss_scale=65536.0))
    assert line.startswith("iter 5 | loss 2.000")
    assert "MFU n/a" in line and "ETA n/a" in line and "TFLOP/s 0.0125" in line
    assert line.endswith("loss_scale 6.554e+04")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_and_console_on_rank0(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(LoggingArgs(log_interval=10), str(tmp_path), 0, {"train_iters": 1000}, stream=out)
    assert logger.should_log(120) and not logger.should_log(125)
    logger.log_train(120, loss=3.4123, lr=5.8e-4, grad_norm=0.912, throughput=stats(), loss_scale=1024)
    logger.log_eval(120, loss=2.0)
    logger.close()
    logger.close()  # idempotent

    console = out.getvalue().splitlines()
    assert console[0].startswith("iter 120/1000 | loss 3.412 | lr 5.8e-04 | grad_norm 0.91 | tok/s 41.2k")
    assert console[0].endswith("ETA 6m02s | loss_scale 1024")
    assert console[1] == "eval valid iter 120 | loss 2.0000 | ppl 7.389"

    train, evaluation = read_jsonl(tmp_path / "metrics.jsonl")
    assert train["type"] == "train" and train["iteration"] == 120
    assert train["loss"] == pytest.approx(3.4123) and train["mfu"] == pytest.approx(0.381)
    assert train["tokens_per_s"] == 41_200.0 and train["loss_scale"] == 1024
    assert evaluation == {**evaluation, "type": "eval", "name": "valid", "iteration": 120, "loss": 2.0}
    assert evaluation["ppl"] == pytest.approx(7.389056)


def test_record_dict_from_the_trainer(tmp_path):
    """The trainer merges its values and a ThroughputStats into one dict and passes it positionally."""
    out = io.StringIO()
    logger = MetricsLogger(LoggingArgs(), str(tmp_path), 0, {"train_iters": 1000}, stream=out)
    record = {"loss": 3.4123, "lr": 5.8e-4, "grad_norm": None, "skipped_steps": 0, "consumed_samples": 3840}
    record.update(stats())
    logger.log_train(120, record)
    logger.log_eval(120, 2.5, 12.18, name="test")
    logger.info("saved checkpoint ckpt/global_step120")
    logger.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == ("iter 120/1000 | loss 3.412 | lr 5.8e-04 | tok/s 41.2k | TFLOP/s 112.5 | MFU 38.1% | "
                        "step 0.41s | ETA 6m02s | skipped_steps 0 | consumed_samples 3840")
    assert lines[1] == "eval test iter 120 | loss 2.5000 | ppl 12.18"
    assert lines[2] == "saved checkpoint ckpt/global_step120"
    train, test = read_jsonl(tmp_path / "metrics.jsonl")
    assert "grad_norm" not in train and train["consumed_samples"] == 3840 and train["eta_s"] == 362.0
    assert test["type"] == "eval" and test["name"] == "test" and test["ppl"] == 12.18


def test_tensor_values_become_plain_numbers(tmp_path):
    import torch

    logger = MetricsLogger(LoggingArgs(), str(tmp_path), 0, {}, stream=io.StringIO())
    logger.log_train(1, loss=torch.tensor(1.5), lr=1e-4, grad_norm=torch.tensor(0.5))
    logger.close()
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["loss"] == 1.5 and record["grad_norm"] == 0.5 and "mfu" not in record


def test_other_ranks_write_nothing(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(LoggingArgs(), str(tmp_path / "run"), 1, {}, stream=out)
    logger.log_train(10, loss=1.0, lr=1e-3)
    logger.log_eval(10, 1.0, 2.7)
    logger.close()
    assert out.getvalue() == "" and not (tmp_path / "run").exists()

    every_rank = MetricsLogger(LoggingArgs(), str(tmp_path / "all"), 1, {}, log_ranks=(0, 1), stream=out)
    every_rank.log_train(10, loss=1.0, lr=1e-3)
    every_rank.close()
    assert len(read_jsonl(tmp_path / "all" / "metrics.jsonl")) == 1


def test_without_run_dir_only_the_console(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(LoggingArgs(), None, 0, {}, stream=out)
    logger.log_train(1, loss=1.0, lr=1e-3)
    logger.close()
    assert out.getvalue().startswith("iter 1 | loss 1.000")


def test_tensorboard_event_file_written(tmp_path):
    tb_dir = tmp_path / "tb"
    logger = MetricsLogger(LoggingArgs(tensorboard_dir=str(tb_dir)), str(tmp_path), 0, {"train_iters": 2},
                           stream=io.StringIO())
    logger.log_train(1, loss=1.25, lr=1e-3, throughput=stats(iteration=1))
    logger.close()
    event_files = [name for name in os.listdir(tb_dir) if name.startswith("events.out.tfevents")]
    assert len(event_files) == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    assert events.Scalars("train/loss")[0].value == pytest.approx(1.25)
    assert events.Scalars("train/mfu")[0].step == 1


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="pip install wandb"):
        MetricsLogger(LoggingArgs(use_wandb=True), str(tmp_path), 0, {}, stream=io.StringIO())


def test_wandb_offline_without_api_key(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, data, step):
            calls.setdefault("log", []).append((data, step))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = LoggingArgs(use_wandb=True, wandb_project="proj", wandb_group="grp")
    logger = MetricsLogger(args, str(tmp_path / "run7"), 0, {"train_iters": 3}, stream=io.StringIO())
    logger.log_train(3, loss=0.5, lr=1e-3)
    logger.close()
    init_kwargs = calls["init"]
    assert init_kwargs["mode"] == "offline"
    assert init_kwargs["project"] == "proj" and init_kwargs["group"] == "grp" and init_kwargs["name"] == "run7"
    assert init_kwargs["config"] == {"train_iters": 3}
    assert calls["log"] == [({"train/loss": 0.5, "train/lr": 1e-3}, 3)]
    assert calls["finished"]

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    MetricsLogger(args, str(tmp_path / "run8"), 0, {}, stream=io.StringIO()).close()
    assert calls["init"]["mode"] == "online"


def test_wandb_team_and_host(tmp_path, monkeypatch):
    calls = {}

    def init(**kwargs):
        calls["init"] = kwargs
        calls["url"] = os.environ.get("WANDB_BASE_URL")
        return types.SimpleNamespace(log=lambda data, step: None, finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    args = LoggingArgs(use_wandb=True, wandb_team="eleutherai", wandb_host="https://wandb.example.org")
    MetricsLogger(args, str(tmp_path / "r"), 0, {}, stream=io.StringIO()).close()
    assert calls["init"]["entity"] == "eleutherai" and calls["url"] == "https://wandb.example.org"
