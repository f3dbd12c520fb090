"""bf16 through deepy.py on CPU (toy size: CPUs here have no bf16 units), in the shipped configs' setup:
bf16 weights, ZeRO stage 1, gradients accumulated in fp32 (DeepSpeed's BF16_Optimizer)."""

import math

from tests.e2e.harness import losses, run_deepy

BF16_FP32_ACCUM = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                   "data_types": {"grad_accum_dtype": "fp32"}, "gradient_accumulation_steps": 2}


def test_bf16_with_fp32_accumulation_trains_and_resumes_exactly(tmp_path):
    records = run_deepy(tmp_path, "full", {**BF16_FP32_ACCUM, "train_iters": 6})
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records), records
    full = losses(records)
    assert sorted(full) == list(range(1, 7)) and all(math.isfinite(v) for v in full.values())
    assert full[6] < full[1] - 0.3, full  # it learns (5.9 = ln 384 at the start)

    save = str(tmp_path / "ckpt")
    run_deepy(tmp_path, "first", {**BF16_FP32_ACCUM, "train_iters": 3, "save": save, "checkpoint_factor": 3})
    resumed = losses(run_deepy(tmp_path, "resumed", {**BF16_FP32_ACCUM, "train_iters": 6, "load": save}))
    assert sorted(resumed) == [4, 5, 6]
    for it in resumed:  # fp32 master weights, fp32 gradient buffers and Adam states all restored
        assert resumed[it] == full[it], (it, resumed[it], full[it])
