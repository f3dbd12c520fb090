"""The schedule follows GPT-NeoX's AnnealingLR formulas exactly (values computed by hand from them)."""

import math

import pytest
import torch

from megatron.training.lr_schedule import WarmupDecayLR
from megatron.training.optimizer import param_groups


def make(style, warmup=10, decay=110, max_lr=1.0, min_lr=0.1):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    return opt, WarmupDecayLR(opt, max_lr=max_lr, min_lr=min_lr, warmup_iters=warmup, decay_iters=decay,
                              decay_style=style)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "exponential"])
def test_warmup_is_upstreams_max_1_t_over_w(style):
    opt, sched = make(style)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # step 0: lr * max(1, 0) / 10
    for step in range(1, 11):
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(max(1, step) / 10)


def test_fractional_warmup_is_not_rounded():
    _, sched = make("constant", warmup=2.5, decay=100)
    assert [sched.lr_at(t) for t in range(4)] == pytest.approx([0.4, 0.4, 0.8, 1.0])


def test_cosine_midpoint_end_and_past_the_end():
    _, sched = make("cosine")
    assert sched.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert sched.lr_at(85) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert sched.lr_at(110) == pytest.approx(0.1)
    # upstream keeps following the cosine after lr_decay_iters: back up toward the peak
    assert sched.lr_at(160) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1.5)))


def test_linear_runs_toward_zero_and_clamps_at_min_lr():
    _, linear = make("linear")
    assert linear.lr_at(35) == pytest.approx(1.0 * (110 - 35) / 100)  # not min_lr + (max - min) * ...
    assert linear.lr_at(100) == pytest.approx(0.1)  # 0.1 reached at t = 100, before lr_decay_iters
    assert linear.lr_at(105) == pytest.approx(0.1) and linear.lr_at(10_000) == pytest.approx(0.1)


def test_constant_and_exponential():
    _, constant = make("constant")
    assert constant.lr_at(500) == pytest.approx(1.0)
    _, exponential = make("exponential", min_lr=0.0)
    assert exponential.lr_at(110) == pytest.approx(math.exp(-0.693))


def test_state_dict_round_trip():
    opt, sched = make("cosine")
    for _ in range(37):
        sched.step()
    opt2, sched2 = make("cosine")
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight)}
    assert len(groups[1]["params"]) == 3  # linear bias, norm weight, norm bias
