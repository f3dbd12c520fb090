"""Divergence policy: a non-finite loss or gradient norm is never trained on silently.

A step is *non-finite* when its gradient norm (or loss) is NaN or inf. Such a step is skipped: the
weights and optimizer states keep their values. Who skips it depends on the optimizer wrapper:

- fp32 without ZeRO (our torch optimizer is the engine's optimizer): `is_nonfinite` here, before
  `engine.step()`; the gradients are already averaged over data parallel and the norm is summed over the
  tensor group, so every rank sees the same verdict. `skipping` then turns that one `optimizer.step()`
  into a no-op: parameters and optimizer states are untouched (no moment decay, no weight decay).
- fp16 (loss-scale overflow), ZeRO stage >= 1 (DeepSpeed's overflow check) and bf16 with fp32
  accumulation (the sync-free fused step, `bf16_optimizer_patches`) skip on their own and count it.

`DivergenceGuard` counts the skipped steps in a row and raises `DivergenceError` once they exceed
`max_consecutive_nonfinite_steps`; a finite step resets the count. Counts read from the device are read
only when the trainer synchronizes anyway (every `log_interval` steps), so a streak is measured from the
steps skipped in each interval: all of them skipped continue the streak, otherwise the streak restarts at
that interval's count (an upper bound of the true trailing streak).

Before a save, `all_finite(engine)` checks weights and optimizer states on every rank: a checkpoint is
never written from non-finite state.
"""

from __future__ import annotations

import contextlib

import torch

from megatron.mpu.checks import all_ranks_true


class DivergenceError(RuntimeError):
    """The run stopped because training diverged; the message names the step and the last good checkpoint."""


def tensors_are_finite(tensors) -> bool:
    """True when every floating tensor in `tensors` is finite (one host read at the end)."""
    bad = None
    for tensor in tensors:
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flag = ~torch.isfinite(tensor.detach()).all()
        bad = flag if bad is None else bad | flag
    return True if bad is None else not bool(bad)


def _optimizer_state_tensors(optimizer):
    """Every tensor of a torch optimizer's state, and of the torch optimizer inside a DeepSpeed wrapper
    (its fp32 master partitions as well, under the names DeepSpeed 0.19 uses)."""
    seen = set()
    stack = [optimizer]
    while stack:
        opt = stack.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        for state in getattr(opt, "state", {}).values() if isinstance(getattr(opt, "state", None), dict) else ():
            if isinstance(state, dict):
                yield from (value for value in state.values() if torch.is_tensor(value))
        for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
            for value in getattr(opt, name, None) or ():
                if torch.is_tensor(value):
                    yield value
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner is not opt:
            stack.append(inner)


def all_finite(engine, model: torch.nn.Module) -> bool:
    """Weights and optimizer states are finite on every rank (a collective: call it on all ranks)."""
    local = tensors_are_finite(model.parameters()) and tensors_are_finite(_optimizer_state_tensors(engine.optimizer))
    return all_ranks_true(local)


class DivergenceGuard:
    """Counts skipped non-finite steps and stops the run after `max_consecutive` of them in a row."""

    def __init__(self, max_consecutive: int, save_dir: str | None = None):
        self.max_consecutive = max_consecutive
        self.save_dir = save_dir
        self.last_good_checkpoint: str | None = None
        self.skipped_here = 0  # steps skipped by `skip_if_nonfinite` (fp32 without ZeRO)
        self.streak = 0
        self._last_total = 0
        self._steps_since_check = 0

    def is_nonfinite(self, grad_norm: torch.Tensor) -> bool:
        """fp32 without ZeRO: whether this step must be skipped (`grad_norm` is the full unclipped norm, the
        same on every rank); counts it. One host read of the norm."""
        if bool(torch.isfinite(grad_norm)):
            return False
        self.skipped_here += 1
        return True

    @staticmethod
    @contextlib.contextmanager
    def skipping(optimizer, skip: bool):
        """Inside, `optimizer.step()` does nothing when `skip` (the engine still clips, zeroes the gradients
        and advances the LR schedule and its step counters, as DeepSpeed does for an fp16 overflow)."""
        if not skip:
            yield
            return
        optimizer.step = lambda *args, **kwargs: None  # shadows the method on this instance only
        try:
            yield
        finally:
            del optimizer.step

    def after_steps(self, iteration: int, total_skipped: int, steps: int = 1) -> None:
        """Update the streak with the skip count after `steps` more steps; raise DivergenceError when it is
        longer than `max_consecutive`. `total_skipped` is the run's count of skipped steps so far."""
        new = total_skipped - self._last_total
        self._last_total = total_skipped
        if new <= 0:
            self.streak = 0
        elif new >= steps:
            self.streak += steps
        else:
            self.streak = new
        if self.streak > self.max_consecutive:
            raise DivergenceError(self.message(iteration))

    def message(self, iteration: int) -> str:
        good = (f"the last good checkpoint is {self.save_dir}/{self.last_good_checkpoint} (resume from it with "
                f"`load: {self.save_dir}` and a lower lr, more warmup or gradient_clipping)"
                if self.last_good_checkpoint else
                "no checkpoint of this run was saved before it (lower lr, add warmup or gradient_clipping and "
                "start again)")
        return (f"training diverged: {self.streak} optimizer steps in a row up to step {iteration} had a "
                f"non-finite loss or gradient norm and were skipped (max_consecutive_nonfinite_steps: "
                f"{self.max_consecutive}); the run stops without saving the current state; {good}.")

    def refuse_save_message(self, iteration: int) -> str:
        good = (f"{self.save_dir}/{self.last_good_checkpoint}" if self.last_good_checkpoint else
                "none (no checkpoint was saved by this run)")
        return (f"training diverged: the weights or optimizer states are not finite (NaN/inf) at step "
                f"{iteration}, so no checkpoint is written from them; the last good checkpoint is {good}. "
                f"Resume from it with a lower lr, more warmup or gradient_clipping.")
