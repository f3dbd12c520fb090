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


def test_freed_gradient_sums_train_and_resume_bit_for_bit(tmp_path):
    """free_grad_sums_between_steps: the fp32 sums hold no memory between steps (checkpoints are saved then)
    and the run, interrupted at step 3 and resumed, has the same losses as the plain run, to the bit."""
    plain = losses(run_deepy(tmp_path, "plain", {**BF16_FP32_ACCUM, "train_iters": 6,
                                                 "free_grad_sums_between_steps": False}))
    freed = {**BF16_FP32_ACCUM, "free_grad_sums_between_steps": True}
    save = str(tmp_path / "ckpt")
    first = losses(run_deepy(tmp_path, "freed", {**freed, "train_iters": 3, "save": save, "checkpoint_factor": 3}))
    resumed = losses(run_deepy(tmp_path, "freed_resumed", {**freed, "train_iters": 6, "load": save}))
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    assert {**first, **resumed} == plain


def test_bf16_tensor_and_sequence_parallel_tracks_one_rank(tmp_path):
    """TP=2 + SP in bf16 with fp32 accumulation follows the TP=1 run within bf16 rounding: the reductions
    run in another order, so not bitwise (measured max abs loss difference over 6 steps: 1.7e-3, 2026-11-22).
    The exact check of the SP gradient sums is the fp32 test in test_tensor_parallel_e2e.py; this one shows
    the shipped bf16 setup (BF16_Optimizer, SP gradient hooks) runs under TP and trains the same model."""
    # vocab 257 padded to 384 at both sizes (128 x 1, 64 x 2): the same function with the same initial weights
    one = losses(run_deepy(tmp_path, "tp1", {**BF16_FP32_ACCUM, "train_iters": 6,
                                             "make_vocab_size_divisible_by": 128}))
    two = losses(run_deepy(tmp_path, "tp2_sp", {**BF16_FP32_ACCUM, "train_iters": 6, "num_gpus": 2,
                                                "model_parallel_size": 2, "sequence_parallel": True}))
    diffs = {it: abs(two[it] - one[it]) for it in one}
    assert sorted(two) == sorted(one) == list(range(1, 7))
    assert max(diffs.values()) < 1e-2, diffs


def test_bf16_zero0_and_zero1_train_the_same_model(tmp_path):
    """With bf16 gradient sums (no `data_types`) DeepSpeed runs FP16_UnfusedOptimizer at ZeRO 0 and its ZeRO
    optimizer at ZeRO 1. Both keep fp32 masters and run our AdamW, so the loss curves agree within bf16
    rounding (measured, 2026-11-22: every difference below 5e-5 with FP16_UnfusedOptimizer's construction
    step undone; without that, Adam's off-by-one bias correction made step 2 differ by 0.114)."""
    plain_bf16 = {"bf16": {"enabled": True}, "train_iters": 6}
    zero0 = losses(run_deepy(tmp_path, "zero0", {**plain_bf16, "zero_optimization": {"stage": 0}}))
    zero1 = losses(run_deepy(tmp_path, "zero1", {**plain_bf16, "zero_optimization": {"stage": 1}}))
    assert sorted(zero0) == sorted(zero1) == list(range(1, 7))
    diffs = {it: round(abs(zero0[it] - zero1[it]), 4) for it in zero0}
    assert max(diffs.values()) < 1e-2, diffs
