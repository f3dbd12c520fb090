"""Undo the optimizer step that DeepSpeed's FP16_UnfusedOptimizer takes when it is built.

DeepSpeed 0.19 wraps our torch optimizer in FP16_UnfusedOptimizer at ZeRO stage 0 with fp16, and with bf16
when the gradients are summed in bf16 (no `data_types.grad_accum_dtype: fp32`). To allocate the optimizer
states, its constructor sets every gradient to zero and calls the inner optimizer's `step()` once
(`initialize_optimizer_states`). For torch's Adam/AdamW that is a real step:

    step count 0 -> 1,   moments stay 0,   master weights  w <- w * (1 - lr * weight_decay)

so every later update carries the bias correction of the step after it. The first real update, with
m = (1 - b1) g and v = (1 - b2) g^2 after two steps, is

    ((1 - b1) / (1 - b1^2)) / sqrt((1 - b2) / (1 - b2^2)) = 0.744 of Adam's at betas (0.9, 0.999)

and the difference fades over ~1/(1 - b2) steps. With SGD, the momentum buffer starts at lr-scaled weight
decay. On the 410M model this alone made ZeRO-0 and ZeRO-1 differ by up to 0.74 in loss within 20 steps
(docs/PERFORMANCE.md). ZeRO stages >= 1 and BF16_Optimizer build their states without a step (DeepSpeed
removed the step there, deepspeedai/DeepSpeed PR 5104; Megatron-LM PR 5976 fixed the same under-update,
1/0.744 = 1.34x, in its FSDP optimizer).

`reset_initialization_step(optimizer)` puts the optimizer back as a freshly built one: the fp32 master
weights are copied again from the low-precision weights (which that step did not touch; the masters were
cloned from them), and the inner optimizer's state is dropped (torch creates it at the first real step).
"""

from __future__ import annotations

from collections import defaultdict

import torch


def needs_reset(optimizer) -> bool:
    """Whether `optimizer` (what `deepspeed.initialize` returned) is DeepSpeed's FP16_UnfusedOptimizer."""
    return type(optimizer).__name__ == "FP16_UnfusedOptimizer"


@torch.no_grad()
def reset_initialization_step(optimizer) -> None:
    """Undo FP16_UnfusedOptimizer's construction step (module docstring). Call it right after
    `deepspeed.initialize`, before any training step or checkpoint load."""
    for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups):
        for master, weight in zip(masters, weights):
            master.copy_(weight)  # low precision -> fp32 is exact: the value the master was cloned from
    optimizer.optimizer.state = defaultdict(dict)
