"""DeepSpeed ZeRO stages 2 and 3 end to end through deepy.py (2 CPU ranks, gloo, fp32).

ZeRO changes where optimizer states, gradients (stage >= 2) and parameters (stage 3) live, never the math:
stage 2 and 3 losses equal stage 0's up to the order of the fp32 gradient reductions (reduce-scatter vs
all-reduce), so they are compared at rel 1e-5 (measured: <= 1.1e-7, most steps bitwise). Dropout is on, so
the runs also check that the RNG streams do not depend on the stage.

ZeRO-3 is run with `stage3_param_persistence_threshold: 0`: with DeepSpeed's default (1e5 elements) every
parameter of this tiny model (the largest is 320 x 64) would stay replicated and nothing would be
partitioned. With 0 every weight is partitioned, including the output projection that the fused
cross-entropy reads outside its owning module (the checkpoint test below sees the empty local tensors).

Finetuning crosses stages through the weights files: a stage-0 checkpoint (full weights) finetunes into
ZeRO-3 with the same losses as into stage 0, and a ZeRO-3 checkpoint (partitions only) finetuned into
stage 0 fails with the consolidation commands instead of DeepSpeed's assertion, then, consolidated as
they say, finetunes.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from megatron.checkpointing import CheckpointError, read_model_state
from tests.e2e.harness import losses, run_deepy

STEPS = 8
COMMON = {"num_gpus": 2, "train_iters": STEPS, "hidden_dropout": 0.1, "attention_dropout": 0.1}
ZERO = {
    0: {"stage": 0},
    2: {"stage": 2},
    3: {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},  # DeepSpeedCPUAdam steps on the host
}
WEIGHTS = {"tied": {}, "untied": {"no_weight_tying": True}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Losses of full runs by (weights, stage), each run once per module (the resume test reuses one)."""
    tmp = tmp_path_factory.mktemp("zero")
    cache = {}

    def get(weights: str, stage: int) -> dict[int, float]:
        if (weights, stage) not in cache:
            overrides = {**COMMON, **WEIGHTS[weights], "zero_optimization": ZERO[stage]}
            cache[weights, stage] = losses(run_deepy(tmp, f"{weights}_zero{stage}", overrides))
        return cache[weights, stage]

    return get


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory):
    """A ZeRO-3 run stopped after 4 of the 8 steps, saved at step 4; returns (save dir, its losses)."""
    tmp = tmp_path_factory.mktemp("zero3_ckpt")
    save = str(tmp / "ckpt")
    first = losses(run_deepy(tmp, "first", {**COMMON, "zero_optimization": ZERO[3], "train_iters": 4,
                                            "save": save, "checkpoint_factor": 4}))
    return save, first


@pytest.mark.parametrize("weights", ["tied", "untied"])
def test_zero2_and_zero3_match_zero0(runs, weights):
    base = runs(weights, 0)
    assert sorted(base) == list(range(1, STEPS + 1))
    assert base[STEPS] < base[1] - 1.0, base  # it trains
    for stage in (2, 3):
        other = runs(weights, stage)
        assert sorted(other) == sorted(base), (stage, other)
        for it in base:
            assert other[it] == pytest.approx(base[it], rel=1e-5), (weights, stage, it, base[it], other[it])


def test_zero2_optimizer_offload_with_cpu_adam_matches_zero0(runs):
    """ZeRO-Offload: the optimizer states live on the host and DeepSpeed's CPU Adam (its C++ kernel, built
    on first use) steps them; the same AdamW math as torch's, so the losses agree with ZeRO-0 up to fp32
    rounding in another order."""
    base, offload = runs("tied", 0), runs("tied", "2_offload")
    assert sorted(offload) == sorted(base)
    for it in base:
        assert offload[it] == pytest.approx(base[it], rel=1e-5), (it, base[it], offload[it])


def test_zero3_resume_continues_the_uninterrupted_run(runs, zero3_checkpoint, tmp_path):
    full = runs("tied", 3)
    save, first = zero3_checkpoint
    assert [first[i] for i in range(1, 5)] == [full[i] for i in range(1, 5)]
    assert open(os.path.join(save, "latest")).read().strip() == "global_step4"
    resumed = losses(run_deepy(tmp_path, "resumed", {**COMMON, "zero_optimization": ZERO[3], "load": save}))
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for it in resumed:
        assert resumed[it] == full[it], (it, resumed[it], full[it])  # bitwise (CPU fp32, same reductions)


def test_zero3_checkpoint_read_model_state_says_how_to_consolidate(zero3_checkpoint, tmp_path):
    save, _ = zero3_checkpoint
    tag_dir = os.path.join(save, "global_step4")
    # the parameters really were partitioned: DeepSpeed's per-rank model files hold empty tensors
    rank0 = torch.load(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"), map_location="cpu",
                       weights_only=False)
    assert rank0["module"]["embedding.word_embeddings.weight"].numel() == 0
    assert not os.path.exists(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))

    with pytest.raises(CheckpointError, match="ZeRO stage 3 checkpoint") as err:
        read_model_state(save)
    message = str(err.value)
    assert "zero_to_fp32.py" in message and "damaged" not in message

    # the advice works: run the two commands of the message, then the checkpoint reads
    out_dir = str(tmp_path / "consolidated")
    commands = re.findall(r"`([^`]+)`", message)
    assert len(commands) == 2, message
    for command in commands:
        proc = subprocess.run(command.replace("<out_dir>", out_dir), shell=True, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
    state, args = read_model_state(save)
    assert args.parallel.zero_optimization["stage"] == 3
    assert state["embedding.word_embeddings.weight"].shape == (320, 64)  # byte-level vocab padded to 320
    assert state["layers.1.mlp.linear_fc2.weight"].shape == (64, 256)
    expected = set(rank0["module"])  # GPTModel.state_dict() keys, as DeepSpeed saved them
    assert set(state) == expected


def test_finetune_full_weights_into_zero3_equals_finetune_into_zero0(runs, tmp_path):
    save = str(tmp_path / "zero0_ckpt")
    run_deepy(tmp_path, "zero0_save", {**COMMON, "zero_optimization": ZERO[0], "train_iters": 4, "save": save,
                                       "checkpoint_factor": 4})
    finetune = {**COMMON, "train_iters": 3, "load": save, "finetune": True}
    into_zero0 = losses(run_deepy(tmp_path, "ft_zero0", {**finetune, "zero_optimization": ZERO[0]}))
    into_zero3 = losses(run_deepy(tmp_path, "ft_zero3", {**finetune, "zero_optimization": ZERO[3]}))
    fresh = runs("tied", 0)
    assert into_zero0[1] < fresh[1] - 0.5, (into_zero0, fresh)  # the trained weights were loaded
    assert sorted(into_zero3) == sorted(into_zero0) == [1, 2, 3]
    for it in into_zero0:
        assert into_zero3[it] == pytest.approx(into_zero0[it], rel=1e-5), (it, into_zero0[it], into_zero3[it])


def test_finetune_from_zero3_into_zero0_needs_and_then_takes_the_consolidated_weights(runs, tmp_path):
    save = str(tmp_path / "zero3_ckpt")  # its own checkpoint: another test consolidates the shared one
    run_deepy(tmp_path, "zero3_save", {**COMMON, "zero_optimization": ZERO[3], "train_iters": 4, "save": save,
                                       "checkpoint_factor": 4})
    finetune = {**COMMON, "train_iters": 2, "load": save, "finetune": True, "zero_optimization": ZERO[0]}
    with pytest.raises(AssertionError) as err:  # run_deepy asserts a zero exit and shows the output
        run_deepy(tmp_path, "ft_partitions", finetune)
    message = str(err.value)
    assert "finetune into zero_optimization.stage 0 from" in message and "zero_to_fp32.py" in message, message[-2000:]
    assert "may be corrupted" not in message

    commands = re.findall(r"`([^`]+)`", message[message.index("finetune into zero_optimization"):])
    assert len(commands) == 2, message[-2000:]
    for command in commands:  # the advice, as given
        proc = subprocess.run(command.replace("<out_dir>", str(tmp_path / "consolidated")), shell=True,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
    tuned = losses(run_deepy(tmp_path, "ft_consolidated", finetune))
    assert sorted(tuned) == [1, 2]
    assert tuned[1] < runs("tied", 0)[1] - 0.5, tuned  # the trained weights, not a fresh model
