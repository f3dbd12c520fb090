"""Pipeline parallelism on GPUs in bf16 and fp16 (DeepSpeed refuses fp16 on CPU, so these are GPU-only).
Needs 2 GPUs of one host: `python -m pytest -m gpu tests/gpu/test_gpu_pipeline.py -q` on nvidia-h200-x2.

PP=2 and PP=1 on the same 2 GPUs (PP=1 as 2 data-parallel replicas, the same global batch) start from the
same seed (layout-independent init) and follow one loss curve within low-precision rounding:
bf16 with fp32 gradient sums at ZeRO-1 (BF16_Optimizer with bf16_optimizer_patches under the pipeline
engine), and fp16 with dynamic loss scaling at ZeRO-0 (FP16_UnfusedOptimizer, fp16_optimizer_init).
"""

import math

import pytest
import torch

from tests.e2e.harness import losses, run_deepy

pytestmark = pytest.mark.gpu

STEPS = 20
SHAPE = {"hidden_size": 256, "num_attention_heads": 4, "num_layers": 4, "seq_length": 256,
         "max_position_embeddings": 256, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
         "train_iters": STEPS, "lr_decay_iters": STEPS, "num_gpus": 2, "hidden_dropout": 0.0,
         "attention_dropout": 0.0}
PRECISIONS = {
    "bf16": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}},
    "fp16": {"fp16": {"enabled": True, "initial_scale_power": 12}, "zero_optimization": {"stage": 0}},
}


@pytest.fixture(autouse=True)
def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.fail("tests/gpu/test_gpu_pipeline.py needs 2 CUDA devices (nvidia-h200-x2)")


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_pp2_follows_pp1_in_low_precision(tmp_path, precision):
    config = {**SHAPE, **PRECISIONS[precision]}
    reference = run_deepy(tmp_path, f"{precision}_pp1", config)
    pipeline = run_deepy(tmp_path, f"{precision}_pp2", {**config, "pipe_parallel_size": 2,
                                                         "gradient_accumulation_steps": 8})
    assert [r["iteration"] for r in pipeline] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in pipeline)
    ref, pipe = losses(reference), losses(pipeline)
    assert pipe[STEPS] < pipe[1] - 1.0, pipe  # it learns
    diffs = [abs(pipe[i] - ref[i]) for i in ref]
    # same math, other rounding order (the stages' sums, the loss-scale's steps): a lost gradient (the head
    # of the last stage, the tied copy) or a wrong clip moves the whole curve by much more
    assert sum(diffs) / len(diffs) < 2e-2, list(zip(ref.values(), pipe.values()))
