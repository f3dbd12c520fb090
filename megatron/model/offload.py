"""Activation checkpointing with the checkpointed input kept in host memory (`checkpoint_in_cpu`).

    y = offloaded_checkpoint(fn, x)        same value as fn(x), and the same gradients

Forward: x (a layer chunk's input `[s, b, h]`, or `[s/tp, b, h]` under SP) is copied to a pinned host
buffer on a side CUDA stream (asynchronous: the compute stream goes on with `fn(x)` at once, and the
device copy of x is freed when the next layer no longer needs it), and `fn` runs without keeping any
activation. Backward: the host copy goes back to the device (asynchronously, pinned), `fn` is run again
with gradients on the RNG states of the forward (torch's default CPU and CUDA generators and the
tensor-parallel tracker streams, so dropout masks are the same), and the output gradient is
back-propagated through it. The device then holds one chunk's input at a time instead of all of them:
num_layers / checkpoint_num_layers x s x b x h x 2 bytes in bf16 move to the host (48 GiB for 1.3B at
512k tokens).

On CPU the "host copy" is a plain copy (the same code path, for the tests). This is the reentrant form
of checkpointing (an autograd Function that runs its own backward), as DeepSpeed's own checkpointing is;
parameter gradients accumulate through the inner backward, so ZeRO's gradient hooks fire as usual.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron.mpu.random import _get_rng_state, _set_rng_state, get_rng_tracker

_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    """One side stream per device for the device-to-host copies."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device=device)
    return _COPY_STREAMS[device]


def to_host(x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(host copy of x, event the copy completes on, or None on CPU). On CUDA the copy runs on a side
    stream into pinned memory; x is marked used by that stream so its memory is not reused early."""
    if x.device.type != "cuda":
        return x.detach().clone(), None
    stream = _copy_stream(x.device)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(x.device))  # x is computed
    with torch.cuda.stream(stream):
        host.copy_(x.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    x.record_stream(stream)
    return host, event


def to_device(host: torch.Tensor, event, device: torch.device) -> torch.Tensor:
    """The host copy back on `device` (asynchronous from pinned memory, ordered after the D2H copy)."""
    if device.type != "cuda":
        return host.clone()
    torch.cuda.current_stream(device).wait_event(event)
    return host.to(device, non_blocking=True)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, x: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.device = x.device
        ctx.rng = _get_rng_state()
        ctx.tracker_states = get_rng_tracker().get_states()
        ctx.host, ctx.event = to_host(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x = to_device(ctx.host, ctx.event, ctx.device).requires_grad_(True)
        ctx.host = None  # the pinned buffer goes as soon as it is back on the device
        tracker = get_rng_tracker()
        caller_rng, caller_tracker = _get_rng_state(), tracker.get_states()
        _set_rng_state(ctx.rng)
        tracker.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                out = ctx.fn(x)
        finally:
            _set_rng_state(caller_rng)
            tracker.set_states(caller_tracker)
        torch.autograd.backward(out, grad_out)
        return None, x.grad


def offloaded_checkpoint(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) with x kept on the host and fn recomputed in backward (see the module docstring).
    `fn` maps one tensor to one tensor of any shape; x must require grad (a layer input does): a reentrant
    checkpoint whose input needs no gradient would never run its backward, and fn's parameters would get none."""
    if not x.requires_grad:
        raise ValueError("checkpoint_in_cpu: the checkpointed input does not require grad (frozen embedding?); "
                         "its layers' parameters would get no gradient. Set checkpoint_in_cpu: false.")
    return _OffloadedCheckpoint.apply(fn, x)
