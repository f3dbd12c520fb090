"""The divergence policy's counting and step skip, and the SIGTERM/SIGINT recorder (issue 13)."""

import os
import signal

import pytest
import torch

from megatron.training.divergence import DivergenceError, DivergenceGuard, all_finite
from megatron.training.preemption import Preemption


def test_streak_counts_consecutive_skips_and_a_finite_step_resets_it():
    guard = DivergenceGuard(max_consecutive=3, save_dir="/ckpt")
    guard.last_good_checkpoint = "global_step4"
    total = 0
    for it, skipped in enumerate([1, 1, 0, 1, 1, 1], start=1):  # a finite step 3 restarts the count
        total += skipped
        guard.after_steps(it, total)
    with pytest.raises(DivergenceError, match="4 optimizer steps in a row up to step 7.*/ckpt/global_step4"):
        guard.after_steps(7, total + 1)


def test_streak_read_every_log_interval_as_in_bf16():
    guard = DivergenceGuard(max_consecutive=15)
    guard.after_steps(10, 3, steps=10)  # 3 of 10 skipped: streak at most 3
    assert guard.streak == 3
    guard.after_steps(20, 13, steps=10)  # all 10 skipped: the streak goes on
    with pytest.raises(DivergenceError, match="no checkpoint of this run was saved"):
        guard.after_steps(30, 23, steps=10)


def test_a_skipped_step_leaves_weights_and_adam_states_untouched():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    guard = DivergenceGuard(max_consecutive=5)
    for param in model.parameters():
        param.grad = torch.full_like(param, float("nan"))
    skip = guard.is_nonfinite(torch.tensor(float("nan")))
    with guard.skipping(optimizer, skip):
        optimizer.step()
    assert skip and guard.skipped_here == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    optimizer.step()  # the method is back
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_all_finite_sees_nan_in_weights_and_in_optimizer_states():
    class Engine:
        pass

    model = torch.nn.Linear(2, 2)
    engine = Engine()
    engine.optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    engine.optimizer.step()
    assert all_finite(engine, model)
    engine.optimizer.state[model.weight]["exp_avg_sq"][0, 0] = float("inf")
    assert not all_finite(engine, model)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_recorded_not_fatal(sig):
    preemption = Preemption().install()
    try:
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)  # a second one (the launcher forwards it again) is ignored
        assert preemption.should_stop() and preemption.signal_name() == sig.name
    finally:
        preemption.uninstall()
    assert signal.getsignal(sig) is not preemption._handle
