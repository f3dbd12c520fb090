"""Training through deepy.py on the GPU (run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`).

The shipped bf16 setup (bf16 weights, fp32 gradient accumulation: DeepSpeed's BF16_Optimizer at ZeRO 1,
fused AdamW, fused cross entropy with its compiled chunk kernels) trains, and per-layer torch.compile gives
the eager run's loss curve within bf16 rounding.
"""

import math

import pytest
import torch

from tests.e2e.harness import losses, run_deepy

pytestmark = pytest.mark.gpu

BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
        "hidden_size": 256, "num_attention_heads": 4, "num_layers": 4, "seq_length": 256,
        "max_position_embeddings": 256, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
        "train_iters": 30, "lr_decay_iters": 30,
        # the init this comparison was calibrated with (the defaults before they became GPT-NeoX's
        # normal/scaled_normal): written out, so that a change of defaults cannot move the tolerance
        "init_method": "small_init", "output_layer_init_method": "wang_init"}


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them with -m gpu on the GPU machine)")


def test_bf16_training_and_compiled_layers_follow_eager(tmp_path):
    eager = run_deepy(tmp_path, "eager", {**BF16, "torch_compile": False})
    compiled = losses(run_deepy(tmp_path, "compiled", {**BF16, "torch_compile": True, "sdpa_backend": "cudnn"}))
    assert all(r.get("peak_mem_gib", 0) > 0 and math.isfinite(r["grad_norm"]) for r in eager)
    eager = losses(eager)
    assert eager[30] < eager[1] - 1.5, eager  # it learns
    diffs = {i: abs(compiled[i] - eager[i]) for i in eager}
    table = " ".join(f"{i}:{eager[i]:.3f}/{compiled[i]:.3f}" for i in eager)  # step:eager/compiled
    # bf16: same math, other rounding order. The curves agree to ~1e-3 for the first steps and then wander
    # apart by up to a few 1e-2 at single steps (one H100 run at c3913e1: mean |diff| 0.004, one step at
    # 0.052 that the next step closed); a wrong compiled kernel or a lost gradient moves the whole curve.
    assert sum(diffs.values()) / len(diffs) < 1e-2, table
    assert max(diffs.values()) < 1e-1, table
