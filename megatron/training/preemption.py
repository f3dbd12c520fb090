"""Preemption: SIGTERM (a scheduler's notice, e.g. Slurm's before it kills a job) and SIGINT (Ctrl-C)
finish the current step, save a checkpoint and end the run with a message.

`setup.build_and_train` installs the handler just before the training loop (a signal during the build
ends the run at once, as before: nothing is trained yet) and restores the previous handlers after it.
The handler only records the signal. After every step the trainer asks `should_stop()`, which agrees over
all ranks (one host-side flag all-reduce, `mpu.checks.any_rank_true`), so every rank stops after the same
step even when the signal reached them at different moments. A second signal of the same kind is ignored
while the save runs; a third SIGINT restores Python's default (KeyboardInterrupt) for a user in a hurry.
DeepSpeed's per-node launcher, which also receives the signal, waits 30 s for the workers before it kills
them: the save of a preempted step has to fit in that time (and in the scheduler's grace period).
"""

from __future__ import annotations

import signal

from megatron.mpu.checks import any_rank_true

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Records SIGTERM/SIGINT; `install()` replaces the handlers, `uninstall()` restores them."""

    def __init__(self):
        self.received: int | None = None
        self._count = 0
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        self._count += 1
        if self.received is None:
            self.received = signum
        if signum == signal.SIGINT and self._count >= 3:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def install(self) -> "Preemption":
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Whether any rank received a signal (collective: every rank calls it after the same step)."""
        return any_rank_true(self.received is not None)

    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
