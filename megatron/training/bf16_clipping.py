"""Gradient norm and clipping for DeepSpeed's BF16_Optimizer without reading the norm on the host.

DeepSpeed 0.19's `BF16_Optimizer.step` (bf16 weights with fp32 gradient accumulation: the shipped bf16
configs) computes the global gradient norm with one `norm()` kernel plus a cast per parameter, replaces a
non-finite norm by -1 through `torch.tensor(-1.0, device=...)` (a copy from pageable host memory), and
clips with `if clip_coef < 1:` (reads the norm on the host). Each host read drains the GPU's queue, and
the GPU then idles while Python issues what follows. On the 410M H100 step these account for ~2.3 ms of
norm kernels and a share of ~10 ms of idle GPU time per step (docs/PERFORMANCE.md).

`install()` replaces the two functions in the optimizer's module with versions that compute the same
values on the device:

    norm  = sqrt( sum over tensor ranks ( sum_i ||g_i||_2^2 ) )      (torch._foreach_norm: a few kernels)
    norm  = -1 if norm is not finite                                  (DeepSpeed's "invalid" sentinel)
    g_i  *= min(1, max_norm / (norm + eps))                           (torch._foreach_mul_, device scalar)

Multiplying by exactly 1.0 when no clipping is needed leaves the gradients bit for bit unchanged, as
DeepSpeed's `if` does. The norm's sum runs in another order than DeepSpeed's per-tensor loop, so it can
differ in the last bits (fp32). The one host read left is DeepSpeed's `is_invalid_grad_norm`: the step must
know on the host whether to skip. Other norms (inf) and expert-parallel groups keep DeepSpeed's code.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

_ORIGINALS: dict[str, Callable] = {}


def global_grad_norm(input_tensors, norm_type=2, mpu=None, moe_ep_group=None) -> torch.Tensor:
    """The L2 norm of all `input_tensors` together over the model-parallel group, -1 if not finite; a
    float32 device scalar (DeepSpeed's `get_global_norm_of_tensors` contract)."""
    tensors = [t.detach() for t in input_tensors]
    if float(norm_type) != 2.0 or moe_ep_group is not None or not tensors:
        from deepspeed.runtime.utils import get_global_norm_of_tensors

        return get_global_norm_of_tensors(input_tensors, norm_type=norm_type, mpu=mpu, moe_ep_group=moe_ep_group)
    norms = torch._foreach_norm([t if t.dtype == torch.float32 else t.float() for t in tensors], 2.0)
    squares = torch.stack(norms).square().sum()  # [] float32, this rank's sum of squares
    if mpu is not None:
        group = mpu.get_model_parallel_group()
        if dist.get_world_size(group=group) > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    norm = squares.sqrt()
    return norm.masked_fill_(~torch.isfinite(norm), -1.0)


def clip_by_global_norm(input_tensors, max_norm=1.0, global_norm=None, mpu=None, eps=1e-6):
    """Scale `input_tensors` in place by min(1, max_norm / (global_norm + eps)); returns the norm."""
    if global_norm is None:
        global_norm = global_grad_norm(input_tensors, mpu=mpu)
    tensors = list(input_tensors)
    if not torch.is_tensor(global_norm):
        if math.isfinite(global_norm) and max_norm / (global_norm + eps) < 1:
            torch._foreach_mul_(tensors, max_norm / (global_norm + eps))
        return global_norm
    if tensors:
        coefficient = (max_norm / (global_norm.float() + eps)).clamp_(max=1.0)  # [] device scalar
        torch._foreach_mul_(tensors, coefficient)
    return global_norm


def install() -> bool:
    """Use the functions above inside DeepSpeed's BF16_Optimizer (idempotent). Returns False, changing
    nothing, if this DeepSpeed's optimizer module does not look them up by these names."""
    import deepspeed.runtime.bf16_optimizer as module

    names = {"get_global_norm_of_tensors": global_grad_norm, "clip_tensors_by_global_norm": clip_by_global_norm}
    if not all(callable(getattr(module, name, None)) for name in names):
        return False
    for name, replacement in names.items():
        current = getattr(module, name)
        if current is not replacement:
            _ORIGINALS[name] = current
            setattr(module, name, replacement)
    return True


def uninstall() -> None:
    """Put DeepSpeed's own functions back (tests compare both)."""
    import deepspeed.runtime.bf16_optimizer as module

    for name, original in list(_ORIGINALS.items()):
        setattr(module, name, original)
        del _ORIGINALS[name]
