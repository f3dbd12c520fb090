"""Summing the gradients of sequence-parallel parameters over the tensor-parallel group.

Under sequence parallelism (SP) a parameter replicated across tensor ranks but applied to
sequence-sharded activations (norm weights/biases, the row-parallel bias, per-shard position
embeddings) receives on rank r only the gradient from sequence chunk r:

    dL/dw = sum_r dL/dw |_(chunk r)

so the true gradient is the sum over the tensor group, taken EXACTLY once per contribution.
Such parameters carry `sequence_parallel_grad = True` (`layers.mark_sequence_parallel_param`).

Two ways to apply the sum; use exactly one per model (`grad_sync_mode(zero_stage, precision)` picks):

1. `allreduce_sequence_parallel_grads(module, state)` -- once per optimizer step: after the
   backward of the last micro-batch and before clipping / the optimizer step. With DeepSpeed:
   `engine.backward(loss)`; `if engine.is_gradient_accumulation_boundary():
   allreduce_sequence_parallel_grads(...)`; `engine.step()`. Summing is linear, so summing the
   accumulated gradient once equals summing every micro-batch; averaging over dp (done inside
   `engine.backward` at the boundary) and summing over tp commute. One flattened buffer per dtype,
   one collective each. It needs the gradients in `param.grad` at that point, which holds for plain
   torch and DeepSpeed ZeRO stage 0 (fp32 and bf16; checked in tests/distributed).

2. `register_sequence_parallel_grad_hooks(module, state)` -- for ZeRO stage >= 1. DeepSpeed 0.19
   moves gradients out of `param.grad` during `engine.backward`: stage 1 at the accumulation
   boundary (`reduce_gradients` -> `reduce_ready_partitions_and_remove_grads`), stage 2/3 on every
   micro-batch from `register_post_accumulate_grad_hook` hooks (with or without `overlap_comm`), so
   no `param.grad` is left for (1). The hook here is a tensor hook on the parameter
   (`param.register_hook`): it runs on each micro-batch's incoming gradient BEFORE it is accumulated,
   hence before any post-accumulate hook of DeepSpeed whatever the registration order; DeepSpeed then
   reduces, partitions and accumulates the already tensor-summed gradient, each micro-batch's
   contribution summed once. (A post-accumulate hook of ours would be wrong: it would run after
   DeepSpeed's, or, with gradient accumulation into `param.grad`, re-sum earlier micro-batches.)
   Cost: one small collective per marked parameter per micro-batch. It is also correct at stage 0.

Both keep a per-parameter counter, `param.sequence_parallel_grad_reductions`, incremented each time
the parameter's gradient is summed (once per step with (1), once per micro-batch with (2)), so tests
can assert that each marked gradient was summed exactly once.
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn

from .mappings import group_size

REDUCTION_COUNTER = "sequence_parallel_grad_reductions"
_HOOK_HANDLE = "_sequence_parallel_grad_hook"


def sequence_parallel_params(module: nn.Module) -> List[nn.Parameter]:
    """The parameters of `module` marked `sequence_parallel_grad`, each once (shared ones deduplicated)."""
    return [p for p in module.parameters() if getattr(p, "sequence_parallel_grad", False)]


def _sp_active(state: Any) -> bool:
    return bool(state.sequence_parallel) and group_size(state.tp_group) > 1


def _count(param: nn.Parameter) -> None:
    setattr(param, REDUCTION_COUNTER, getattr(param, REDUCTION_COUNTER, 0) + 1)


def grad_sync_mode(zero_stage: int, precision: str = "fp32") -> str:
    """Which of the two methods fits: "once_per_step" only for plain fp32 at ZeRO stage 0 (or no
    DeepSpeed), "hooks" otherwise. With bf16 or fp16 DeepSpeed wraps the optimizer (FP16_Optimizer,
    BF16_Optimizer, by config) and some wrappers move each micro-batch's `param.grad` into their own
    fp32 buffers inside `engine.backward` (BF16_Optimizer.backward_epilogue -> update_hp_grads), where a
    later sum of `param.grad` would not reach the update. The hooks act before any such copy, so they
    are used whenever a mixed-precision wrapper is present. See the module docstring."""
    return "once_per_step" if int(zero_stage) == 0 and precision == "fp32" else "hooks"


def allreduce_sequence_parallel_grads(module: nn.Module, state: Any) -> int:
    """Sum `param.grad` over `state.tp_group` for every parameter marked `sequence_parallel_grad`.

    Call once per optimizer step (see the module docstring). No-op (returns 0) when sequence
    parallelism is off or the tensor group has size 1. Returns the number of gradients summed.
    """
    if not _sp_active(state):
        return 0
    marked = sequence_parallel_params(module)
    params = [p for p in marked if p.grad is not None]
    if marked and not params:
        raise RuntimeError(
            "allreduce_sequence_parallel_grads: no parameter marked sequence_parallel_grad has a .grad. "
            "Call it after the last micro-batch's backward and before the optimizer step; under DeepSpeed "
            "ZeRO stage >= 1 gradients leave param.grad during engine.backward, so use "
            "register_sequence_parallel_grad_hooks(module, state) instead (see megatron/mpu/grads.py).")
    if any(hasattr(p, _HOOK_HANDLE) for p in params):
        raise RuntimeError("allreduce_sequence_parallel_grads: these parameters already have "
                           "register_sequence_parallel_grad_hooks hooks; use only one of the two.")
    by_dtype = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group_params in by_dtype.values():
        grads = [p.grad for p in group_params]
        flat = torch.cat([g.reshape(-1) for g in grads])                    # [sum numel]
        dist.all_reduce(flat, group=state.tp_group)
        offset = 0
        for p, g in zip(group_params, grads):
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
            _count(p)
    return len(params)


def register_sequence_parallel_grad_hooks(module: nn.Module, state: Any) -> int:
    """Register, on each marked parameter, a gradient hook that sums each micro-batch's incoming
    gradient over `state.tp_group` before it is accumulated (ZeRO stage 2/3; see the module docstring).

    Idempotent: a parameter already hooked (e.g. reached again through a wrapper module) is skipped.
    Returns the number of hooks registered now; 0 when SP is off or the tensor group has size 1.
    """
    if not _sp_active(state):
        return 0
    group = state.tp_group
    registered = 0
    for p in sequence_parallel_params(module):
        if hasattr(p, _HOOK_HANDLE):
            continue

        def hook(grad: torch.Tensor, param=p) -> torch.Tensor:
            summed = grad.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(summed, group=group)
            _count(param)
            return summed

        setattr(p, _HOOK_HANDLE, p.register_hook(hook))
        registered += 1
    return registered


def remove_sequence_parallel_grad_hooks(module: nn.Module) -> None:
    """Remove the hooks added by `register_sequence_parallel_grad_hooks`."""
    for p in sequence_parallel_params(module):
        handle = getattr(p, _HOOK_HANDLE, None)
        if handle is not None:
            handle.remove()
            delattr(p, _HOOK_HANDLE)


def reset_reduction_counters(module: nn.Module) -> None:
    """Set every marked parameter's `sequence_parallel_grad_reductions` counter to 0."""
    for p in sequence_parallel_params(module):
        setattr(p, REDUCTION_COUNTER, 0)
