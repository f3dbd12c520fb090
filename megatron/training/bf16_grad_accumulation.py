"""Fewer host launches in DeepSpeed's BF16_Optimizer gradient accumulation.

With bf16 weights and `data_types.grad_accum_dtype: fp32` (the shipped bf16 configs), DeepSpeed 0.19's
`BF16_Optimizer.update_hp_grads` runs after every micro-batch's backward and, for each parameter in turn,
casts its bf16 gradient to a new fp32 tensor and adds that into the parameter's slice of the fp32 gradient
buffer:

    for each parameter p:   hp_grad[p] += p.grad.to(float32)          (2 kernels + 1 allocation each)

On the 410M model (292 parameter tensors) that is ~600 kernel launches and 11.9 ms of host time per
micro-batch on an H100 machine (cProfile in `tools/bench --profile`), while the GPU does the work in a
few milliseconds. There the host and the GPU take about equally long per micro-batch (~85 ms each), so the
host's time can be on the critical path (docs/PERFORMANCE.md has the prediction and, once run, the
measurement). `install()` replaces the method with one multi-tensor add per parameter group:

    torch._foreach_add_([hp_grad[p] for p], [p.grad for p])            (fp32 += bf16, in-kernel upcast)

which adds the same values (bf16 -> fp32 is exact, so the sums are bit for bit DeepSpeed's) without the
temporary fp32 copies. Everything else the method does is kept: the `_hp_grad` link on each parameter, the
"has gradient" flags the norm and the step read, zeroing the bf16 gradients when asked. Optimizers that
accumulate in backward hooks (`immediate_grad_update`) or correct expert-parallel gradients first
(`autoep_folding_tp_group`) keep DeepSpeed's method.
"""

from __future__ import annotations

from typing import Callable

import torch

_ORIGINAL: dict[str, Callable] = {}
_NEEDED_ATTRIBUTES = ("bf16_groups", "fp32_groups_gradients", "fp32_groups_has_gradients", "immediate_grad_update")


@torch.no_grad()
def update_hp_grads(self, clear_lp_grads: bool = False) -> None:
    """BF16_Optimizer.update_hp_grads with one multi-tensor add per group (see the module docstring)."""
    if self.immediate_grad_update:
        return
    if getattr(self, "autoep_folding_tp_group", None) is not None or not all(
            hasattr(self, name) for name in _NEEDED_ATTRIBUTES):
        return _ORIGINAL["update_hp_grads"](self, clear_lp_grads=clear_lp_grads)
    for group_index, group in enumerate(self.bf16_groups):
        hp_grads, lp_grads = [], []
        for param_index, lp in enumerate(group):
            if lp.grad is None:
                continue
            hp_grad = self.fp32_groups_gradients[group_index][param_index]
            hp_grads.append(hp_grad)
            lp_grads.append(lp.grad.view(hp_grad.shape))
            lp._hp_grad = hp_grad
            self.fp32_groups_has_gradients[group_index][param_index] = True
        if hp_grads:
            torch._foreach_add_(hp_grads, lp_grads)  # fp32 += bf16, upcast inside the kernel
            if clear_lp_grads:
                torch._foreach_zero_(lp_grads)


def install() -> bool:
    """Use `update_hp_grads` above in DeepSpeed's BF16_Optimizer (idempotent). Returns False, changing
    nothing, when this DeepSpeed has no such optimizer method."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    current = getattr(BF16_Optimizer, "update_hp_grads", None)
    if not callable(current):
        return False
    if current is not update_hp_grads:
        _ORIGINAL["update_hp_grads"] = current
        BF16_Optimizer.update_hp_grads = update_hp_grads
    return True


def uninstall() -> None:
    """Put DeepSpeed's method back (tests compare both)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if "update_hp_grads" in _ORIGINAL:
        BF16_Optimizer.update_hp_grads = _ORIGINAL.pop("update_hp_grads")
