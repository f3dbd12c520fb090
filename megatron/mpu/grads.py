"""Summing the gradients of sequence-parallel parameters over the tensor-parallel group.

Under sequence parallelism (SP) a parameter replicated across tensor ranks but applied to
sequence-sharded activations (norm weights/biases, the row-parallel bias, per-shard position
embeddings) receives on rank r only the gradient from sequence chunk r:

    dL/dw = sum_r dL/dw |_(chunk r)

so the true gradient is the sum over the tensor group, taken EXACTLY once per contribution.
Such parameters carry `sequence_parallel_grad = True` (`layers.mark_sequence_parallel_param`).

Two ways to apply the sum; use exactly one per model:

1. `allreduce_sequence_parallel_grads(module, state)` -- once per optimizer step, after the
   backward of the last micro-batch and before gradient clipping / `engine.step()`. Summing is
   linear, so summing the accumulated gradient once equals summing every micro-batch. It needs the
   gradients to be in `param.grad` at that point: DeepSpeed ZeRO stage 0 and 1 (the data-parallel
   reduction in `engine.backward` leaves `param.grad` in place; averaging over dp and summing over
   tp commute). One flattened buffer per dtype, one collective each.

2. `register_sequence_parallel_grad_hooks(module, state)` -- for ZeRO stage 2 and 3. There,
   DeepSpeed's own hooks on each parameter's gradient accumulator move the gradient into its
   reduction buckets (and, with `overlap_comm`, start the data-parallel reduce-scatter) during
   backward, and `param.grad` is released; no `param.grad` is left for a once-per-step function.
   The hook here is a tensor hook on the parameter (`param.register_hook`), which runs on each
   micro-batch's incoming gradient BEFORE it is accumulated, i.e. before DeepSpeed's accumulate-grad
   hooks see it; so DeepSpeed reduces, partitions and accumulates the already tensor-summed gradient,
   each micro-batch's contribution summed once. (A post-accumulate hook would be wrong: with gradient
   accumulation it would re-sum the previous micro-batches' already-summed gradient.) It costs one
   small collective per marked parameter per micro-batch.

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


def allreduce_sequence_parallel_grads(module: nn.Module, state: Any) -> int:
    """Sum `param.grad` over `state.tp_group` for every parameter marked `sequence_parallel_grad`.

    Call once per optimizer step (see the module docstring). No-op (returns 0) when sequence
    parallelism is off or the tensor group has size 1. Returns the number of gradients summed.
    """
    if not _sp_active(state):
        return 0
    params = [p for p in sequence_parallel_params(module) if p.grad is not None]
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
