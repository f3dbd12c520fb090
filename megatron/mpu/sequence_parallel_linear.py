"""Linear layer with a sequence-parallel all-gather of its input, saving only the local shard.

Under sequence parallelism a column-parallel matmul needs the FULL sequence: rank r holds X_r
`[s/p, b, in]`, and computes Y = X A_r^T + b_r with X = cat(X_0, ..., X_{p-1}) along dim 0
(`[s, b, in]`). Written as `gather_from_sequence_parallel_region` followed by `F.linear`, autograd
keeps the gathered X (p times the shard) alive until backward, for the weight gradient. This
function keeps only X_r and all-gathers X again in backward (Korthikanti et al. 2022, sec. 4.2.2;
Megatron-LM's LinearWithGradAccumulationAndAsyncCommunication does the same):

    forward:   X = all_gather_seq(X_r)                  [s, b, in]   (freed after forward)
               Y = X W^T + b                            [s, b, out/p]
               saved: X_r and W (not X)
    backward:  X = all_gather_seq(X_r)          (async, overlaps the next matmul)
               dX = dY W                                [s, b, in]   partial: only this rank's columns
               dX_r = chunk_r(sum_q dX^(q))   (reduce-scatter, async, overlaps the next matmul)
               dW = dY^T X  (over all s*b rows)         [out/p, in]
               db = sum of dY over all s*b rows         [out/p]

The input gradient is a reduce-scatter because Y feeds tensor-parallel computation: each rank's dX
is the partial sum over its own output columns (the backward of `gather_from_sequence_parallel_region`
with `tensor_parallel_output_grad=True`). The sequence dim must be dim 0 (`[s, b, h]`), so every
collective acts on whole contiguous rows: no transpose and no copy around it.

Cost: one extra all-gather of the input per layer in backward (the communication of SP becomes
that of Megatron's SP: all-gather + reduce-scatter forward, all-gather + reduce-scatter backward per
column-parallel layer); memory saved per call: (p-1)/p of the gathered input.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .mappings import _all_gather_dim0, _reduce_scatter_dim0, group_size


class _LinearWithSequenceParallelGather(torch.autograd.Function):
    """See the module docstring. Inputs: x_local `[s/p, ..., in]`, weight `[out/p, in]`, bias `[out/p]`."""

    @staticmethod
    def forward(ctx, x_local, weight, bias, group):
        ctx.group = group
        ctx.has_bias = bias is not None
        total = _all_gather_dim0(x_local, group)          # [s, ..., in], not saved
        ctx.save_for_backward(x_local, weight)
        return F.linear(total, weight, bias)              # [s, ..., out/p]

    @staticmethod
    def backward(ctx, grad_out):
        x_local, weight = ctx.saved_tensors
        group = ctx.group
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None

        if need_w:  # re-gather the input; the input-gradient matmul below runs meanwhile
            total, gather = _all_gather_dim0(x_local, group, async_op=True)
        scatter = None
        if need_x:
            grad_total = grad_out.matmul(weight)          # [s, ..., in], partial over tensor ranks
            if need_w:
                gather.wait()  # (NCCL runs them in issue order anyway; gloo's worker threads might not)
            grad_x, scatter = _reduce_scatter_dim0(grad_total, group, async_op=True)  # [s/p, ..., in]
        if need_w or need_b:
            grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])  # [s*b, out/p] (a view if contiguous)
            if need_w:
                gather.wait()
                grad_w = grad_out_2d.t().matmul(total.reshape(-1, total.shape[-1]))  # [out/p, in]
            if need_b and ctx.has_bias:
                grad_b = grad_out_2d.sum(0)
        if scatter is not None:
            scatter.wait()
        return grad_x, grad_w, grad_b, None


def linear_with_sequence_parallel_gather(x_local: torch.Tensor, weight: torch.Tensor,
                                         bias: Optional[torch.Tensor], group: Any) -> torch.Tensor:
    """`F.linear(all_gather_seq(x_local), weight, bias)` that saves only `x_local` for backward.

    x_local `[s/p, ..., in]` (this rank's sequence shard, sequence on dim 0), weight `[out/p, in]`,
    bias `[out/p]` or None -> `[s, ..., out/p]`. Backward: input gradient reduce-scattered along the
    sequence (the output feeds tensor-parallel computation). A `None` or size-1 group is plain F.linear.
    """
    if group_size(group) == 1:
        return F.linear(x_local, weight, bias)
    return _LinearWithSequenceParallelGather.apply(x_local, weight, bias, group)
