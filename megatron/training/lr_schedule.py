"""Learning-rate schedule: GPT-NeoX's AnnealingLR formulas (linear warmup, then a decay style).

With `t` = optimizer steps already taken (0 for the first step), `W` = warmup * lr_decay_iters (a float,
not rounded, as upstream), `E` = lr_decay_iters and `lr` = the peak:

    t <= W (and W > 0):  lr(t) = lr * max(1, t) / W        (steps 0 and 1 both use lr / W, as upstream)
    t >  W, n = t - W:
        constant:     lr
        linear:       lr * (E - t) / (E - W)               (toward 0 at E, not toward min_lr)
        cosine:       min_lr + (lr - min_lr) / 2 * (1 + cos(pi * n / (E - W)))   (keeps following the
                      cosine past E, back up toward lr, as upstream does; train_iters <= E avoids it)
        exponential:  lr * exp(-0.693 * n / (E - W))       (halves every E - W steps)
    finally:          max(that, min_lr)

Upstream's linear decay reaches min_lr before E when min_lr > 0 (it runs toward 0 and is clamped), and its
cosine past E is its documented behaviour; both are matched here on purpose. DeepSpeed calls `step()` after
every optimizer step it takes (skipped fp16 overflow steps included, as in GPT-NeoX); the state is the step
count alone, saved with the checkpoint.
"""

from __future__ import annotations

import math

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")


class WarmupDecayLR:
    """Sets `lr` of every param group of `optimizer` from the formula above."""

    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_iters: float, decay_iters: int,
                 decay_style: str):
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {DECAY_STYLES}, got {decay_style!r}")
        self.optimizer = optimizer
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.warmup_iters = float(warmup_iters)
        self.decay_iters = max(1, decay_iters)
        self.decay_style = decay_style
        self.num_steps = 0
        self._apply(self.lr_at(0))

    def lr_at(self, step: int) -> float:
        """The learning rate used by optimizer step number `step` (0-based)."""
        warmup, end = self.warmup_iters, self.decay_iters
        if warmup > 0 and step <= warmup:
            return self.max_lr * max(1, step) / warmup
        span = end - warmup
        if self.decay_style == "constant" or span <= 0:
            lr = self.max_lr
        elif self.decay_style == "linear":
            lr = self.max_lr * (end - step) / span
        elif self.decay_style == "cosine":
            lr = self.min_lr + (self.max_lr - self.min_lr) / 2.0 * (math.cos(math.pi * (step - warmup) / span) + 1)
        else:
            lr = self.max_lr * math.exp(-0.693 * (step - warmup) / span)
        return max(lr, self.min_lr)

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
