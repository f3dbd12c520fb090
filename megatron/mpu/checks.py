"""Agreement between all ranks on a host-side verdict (finite state, a stop signal, an error to report).

Each is one small collective over the whole world on a CPU tensor through a gloo group (the default group
when the backend is gloo; a gloo side group, created once by `host_group()` on every rank, under NCCL), so
it never waits for the device's queue. Without torch.distributed they return the local value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_HOST_GROUP = None


def host_group():
    """The gloo group over all ranks used for host-side flags; the first call is collective (every rank)."""
    global _HOST_GROUP
    if not dist.is_initialized():
        return None
    if dist.get_backend() == "gloo":
        return None  # the default group
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def _all_reduce_flag(value: bool, op) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    flag = torch.tensor([1 if value else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=op, group=host_group())
    return bool(flag.item())


def all_ranks_true(value: bool) -> bool:
    """True when `value` is True on every rank."""
    return _all_reduce_flag(value, dist.ReduceOp.MIN)


def any_rank_true(value: bool) -> bool:
    """True when `value` is True on at least one rank."""
    return _all_reduce_flag(value, dist.ReduceOp.MAX)


def first_error_message(message: str | None) -> str | None:
    """The message of the lowest rank that has one (None when no rank has), the same on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=host_group())
    return next((m for m in messages if m is not None), None)


def from_rank0(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=host_group())
    return values


def rank_and_world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()
