"""Paired autograd collectives for tensor and sequence parallelism.

Each function below is an autograd `Function` whose forward is a collective over an explicit
`group` and whose backward is the adjoint (transpose) collective, written side by side:

    forward                         backward
    identity                        all-reduce                 copy_to_tensor_parallel_region
    all-reduce                      identity                   reduce_from_tensor_parallel_region
    split last dim                  all-gather last dim        scatter_to_tensor_parallel_region
    all-gather last dim             split last dim             gather_from_tensor_parallel_region
    split seq dim                   all-gather seq dim         scatter_to_sequence_parallel_region
    all-gather seq dim              reduce-scatter seq dim     gather_from_sequence_parallel_region
                                    (or split seq dim)
    reduce-scatter seq dim          all-gather seq dim         reduce_scatter_to_sequence_parallel_region

Notation: p = group size, r = this rank, X_i = the i-th of p equal chunks along the named dim.
A `None` group or a group of size 1 makes every function the identity (single-process runs).

The single-tensor collectives (`all_gather_single` / `reduce_scatter_single`, called
`all_gather_into_tensor` / `reduce_scatter_tensor` before torch 2.10) work on dim 0: on `[s, b, h]`
activations a sequence collective needs no transpose and no copy (a collective along another dim moves
that dim to the front, contiguous, and back). Every backend, NCCL and gloo, goes through these same
calls; only a gloo group whose torch lacks the single-tensor op (older versions) falls back, once
detected, to all-reduce + own chunk and all_gather into a list + cat. The fallback is never taken on
NCCL (an error there is raised, not hidden).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------
# Group helpers and raw primitives (no autograd)
# ----------------------------------------------------------------------------------------------

def group_size(group: Any) -> int:
    """Size of `group`; 1 for `None` (the single-process convention of this package)."""
    if group is None:
        return 1
    return dist.get_world_size(group=group)


def group_rank(group: Any) -> int:
    """This process's rank inside `group`; 0 for `None`."""
    if group is None:
        return 0
    return dist.get_rank(group=group)


def _is_gloo(group: Any) -> bool:
    return dist.get_backend(group) == "gloo"


# the single-tensor collectives under their current names (the old names warn since torch 2.10)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# ops a gloo group has refused in single-tensor form (older torch): those use the fallback from then on
_GLOO_WITHOUT_SINGLE_OP: set = set()


def _try_single_op(op: str, call, group: Any) -> bool:
    """Run the single-tensor collective `call()`; False when a gloo group lacks it (use the fallback).
    On any other backend (NCCL) an error is raised, never hidden behind the fallback."""
    if op in _GLOO_WITHOUT_SINGLE_OP and _is_gloo(group):
        return False
    try:
        call()
        return True
    except (RuntimeError, NotImplementedError) as exc:
        if not _is_gloo(group) or "support" not in str(exc).lower():  # only "gloo does not support ..."
            raise
        _GLOO_WITHOUT_SINGLE_OP.add(op)
        return False


class _Done:
    """Handle of a collective that already finished (the synchronous gloo fallbacks)."""

    def wait(self) -> bool:
        return True


def all_reduce(x: torch.Tensor, group: Any, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Return the all-reduce of `x` over `group` (a new tensor; `x` is never modified)."""
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def _check_divisible(x: torch.Tensor, dim: int, world: int, what: str) -> int:
    length = x.size(dim)
    if length % world != 0:
        raise ValueError(
            f"{what}: size {length} of dim {dim} (shape {tuple(x.shape)}) is not divisible by the "
            f"tensor-parallel size {world}. With sequence parallelism the sequence length must be a "
            f"multiple of the tensor-parallel size.")
    return length // world


def split_along_dim(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Keep this rank's chunk X_r of `x` split into p equal chunks along `dim` (contiguous copy)."""
    world = group_size(group)
    if world == 1:
        return x
    chunk = _check_divisible(x, dim, world, "split")
    return x.narrow(dim, group_rank(group) * chunk, chunk).contiguous()


def _all_gather_dim0(x: torch.Tensor, group: Any, async_op: bool = False):
    """[n, ...] on each rank -> [p*n, ...], chunks in rank order, written straight into one buffer.

    `async_op=True` returns `(out, handle)`; `out` is valid after `handle.wait()`.
    """
    world = group_size(group)
    x = x.contiguous()  # a no-op for the [s, b, h] activations passed here
    out = torch.empty((world * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = []
    if not _try_single_op("all_gather", lambda: work.append(
            _all_gather_single(out, x, group=group, async_op=async_op)), group):
        dist.all_gather(list(out.chunk(world, 0)), x, group=group)  # gloo fallback: views of `out`
        work = [_Done()]
    return (out, work[0]) if async_op else out


def _reduce_scatter_dim0(x: torch.Tensor, group: Any, async_op: bool = False):
    """[p*n, ...] on each rank -> [n, ...] = chunk r of the sum over ranks.

    `async_op=True` returns `(out, handle)`; `out` is valid after `handle.wait()`.
    """
    world = group_size(group)
    chunk = _check_divisible(x, 0, world, "reduce-scatter")
    x = x.contiguous()  # a no-op for the [s, b, h] activations passed here
    out = torch.empty((chunk,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = []
    if not _try_single_op("reduce_scatter", lambda: work.append(
            _reduce_scatter_single(out, x, group=group, async_op=async_op)), group):
        summed = x.clone()  # gloo fallback: all-reduce, keep own chunk
        dist.all_reduce(summed, group=group)
        out.copy_(summed.narrow(0, group_rank(group) * chunk, chunk))
        work = [_Done()]
    return (out, work[0]) if async_op else out


def gather_along_dim(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """All-gather along `dim`: [.., n, ..] on each rank -> [.., p*n, ..] = cat(X_0, ..., X_{p-1})."""
    if group_size(group) == 1:
        return x
    dim = dim % x.dim()
    if dim == 0:
        return _all_gather_dim0(x, group)
    gathered = _all_gather_dim0(x.movedim(dim, 0), group)
    return gathered.movedim(0, dim).contiguous()


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Reduce-scatter along `dim`: [.., p*n, ..] -> [.., n, ..] = chunk r of sum over ranks."""
    world = group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    _check_divisible(x, dim, world, "reduce-scatter")
    if dim == 0:
        return _reduce_scatter_dim0(x, group)
    scattered = _reduce_scatter_dim0(x.movedim(dim, 0), group)
    return scattered.movedim(0, dim).contiguous()


# ----------------------------------------------------------------------------------------------
# Tensor-parallel region (hidden / last dim)
# ----------------------------------------------------------------------------------------------

class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Forward: Y = X (every rank holds the full X). Backward: dL/dX = sum_r dL/dY_r (all-reduce).

    Used before a column-parallel matmul: each rank's shard of the output depends on all of X,
    so X's gradient is the sum of every rank's partial gradient.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Forward: Y = sum_r X_r (all-reduce of partial sums). Backward: dL/dX_r = dL/dY (identity).

    Used after a row-parallel matmul: Y = sum_r X_r A_r, and Y is replicated, so each rank's
    partial sum receives the same (replicated) gradient.
    """

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    """Forward: Y = X_r, the r-th chunk of X along the last dim. Backward: dL/dX = cat_r(dL/dY_r)
    along the last dim (all-gather)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_dim(grad, -1, ctx.group), None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    """Forward: Y = cat(X_0, ..., X_{p-1}) along the last dim (all-gather). Backward: dL/dX_r = the
    r-th chunk of dL/dY along the last dim (split)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split_along_dim(grad, -1, ctx.group), None


# ----------------------------------------------------------------------------------------------
# Sequence-parallel region (sequence dim: 0 for [s, b, h], 1 for [b, s, h])
# ----------------------------------------------------------------------------------------------

class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: Y = X_r, the r-th chunk of X along the sequence dim (split, X replicated).
    Backward: dL/dX = cat_r(dL/dY_r) along the sequence dim (all-gather)."""

    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        return split_along_dim(x, seq_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_dim(grad, ctx.seq_dim, ctx.group), None, None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: Y = cat(X_0, ..., X_{p-1}) along the sequence dim (all-gather).

    Backward, `tensor_parallel_output_grad=True` (the default): Y feeds tensor-parallel computation
    (e.g. a column-parallel matmul), so each rank holds only a partial dL/dY; the full gradient is
    their sum, and rank r needs its chunk: dL/dX_r = chunk_r(sum_q dL/dY^(q)) (reduce-scatter).
    Backward, `tensor_parallel_output_grad=False`: Y feeds replicated computation, every rank holds
    the same full dL/dY, so dL/dX_r = chunk_r(dL/dY) (split).
    """

    @staticmethod
    def forward(ctx, x, group, seq_dim, tensor_parallel_output_grad):
        ctx.group, ctx.seq_dim = group, seq_dim
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return gather_along_dim(x, seq_dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter_along_dim(grad, ctx.seq_dim, ctx.group), None, None, None
        return split_along_dim(grad, ctx.seq_dim, ctx.group), None, None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: Y_r = chunk_r(sum_q X^(q)) along the sequence dim (reduce-scatter of partial sums).
    Backward: dL/dX^(q) = cat_r(dL/dY_r) along the sequence dim (all-gather), for every q."""

    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        return reduce_scatter_along_dim(x, seq_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_dim(grad, ctx.seq_dim, ctx.group), None, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def copy_to_tensor_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Forward identity, backward all-reduce over `group`."""
    if group_size(group) == 1:
        return x
    return _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Forward all-reduce (sum) over `group`, backward identity."""
    if group_size(group) == 1:
        return x
    return _ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Forward: keep this rank's chunk of the last dim; backward: all-gather the last dim."""
    if group_size(group) == 1:
        return x
    return _ScatterToTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Forward: all-gather the last dim; backward: keep this rank's chunk of the last dim."""
    if group_size(group) == 1:
        return x
    return _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any, seq_dim: int = 0) -> torch.Tensor:
    """Forward: keep this rank's chunk of the sequence dim; backward: all-gather the sequence dim."""
    if group_size(group) == 1:
        return x
    return _ScatterToSequenceParallelRegion.apply(x, group, seq_dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Any, seq_dim: int = 0,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """Forward: all-gather the sequence dim. Backward: reduce-scatter along the sequence dim when
    the output feeds tensor-parallel computation (default), else split (see the class docstring)."""
    if group_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, seq_dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any, seq_dim: int = 0) -> torch.Tensor:
    """Forward: reduce-scatter (sum, keep own sequence chunk); backward: all-gather the sequence dim."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group, seq_dim)
