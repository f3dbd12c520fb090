"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay to `min_lr`.

With `t` = optimizer steps already taken, `W` = warmup steps and `D` = decay steps (`lr_decay_iters`):

    t <  W:       lr(t) = max_lr * (t + 1) / W                       (the first step already moves)
    W <= t <  D:  p = (t - W) / (D - W)
                  constant: lr = max_lr
                  linear:   lr = min_lr + (max_lr - min_lr) * (1 - p)
                  cosine:   lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2
    t >= D:       lr = min_lr  (max_lr for constant)

DeepSpeed calls `step()` after every optimizer step it takes (skipped fp16 overflow steps included, as
in GPT-NeoX); the state is the step count alone, saved with the checkpoint.
"""

from __future__ import annotations

import math


class WarmupDecayLR:
    """Sets `lr` of every param group of `optimizer` from the formula above."""

    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 decay_style: str):
        if decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_decay_style must be constant, linear or cosine, got {decay_style!r}")
        self.optimizer = optimizer
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.warmup_iters = warmup_iters
        self.decay_iters = max(decay_iters, warmup_iters)
        self.decay_style = decay_style
        self.num_steps = 0
        self._apply(self.lr_at(0))

    def lr_at(self, step: int) -> float:
        """The learning rate used by optimizer step number `step` (0-based)."""
        if step < self.warmup_iters:
            return self.max_lr * (step + 1) / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if step >= self.decay_iters:
            return self.min_lr
        progress = (step - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            scale = 1.0 - progress
        else:
            scale = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.max_lr - self.min_lr) * scale

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply(self.lr_at(self.num_steps))

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply(self.lr_at(self.num_steps))
