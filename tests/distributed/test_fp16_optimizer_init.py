"""megatron/engine/fp16_optimizer_init.py inside a real DeepSpeed engine (bf16 weights, bf16 gradient sums,
ZeRO 0 -> FP16_UnfusedOptimizer, torch AdamW, one gloo rank).

- As DeepSpeed builds it, the inner AdamW has already taken a step (step count 1) and decayed the fp32
  masters: the first real update is 0.744 of Adam's (the negative control; if a DeepSpeed release stops
  doing this, this check fails and the reset can go).
- After `reset_initialization_step` the masters are the bf16 weights again, the state is empty, and three
  training steps update the masters bit for bit as a fresh torch AdamW given the same fp32 gradients.
"""

import torch
from torch import nn

from tests.helpers.distributed import run_distributed

LR, WEIGHT_DECAY, BETAS = 1e-2, 0.1, (0.9, 0.999)


def _engine(state):
    import deepspeed

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0, "bf16": {"enabled": True}}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, mpu=state.deepspeed_mpu())
    return engine


def _masters(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for group in engine.optimizer.fp32_groups for p in group]


def _train_and_replay(engine, steps: int):
    """Train `steps` steps; return (masters after each step, the same steps replayed by a fresh AdamW on
    copies of the starting masters with the gradients the engine computed)."""
    start = _masters(engine)
    replica = [m.clone() for m in start]
    reference = torch.optim.AdamW(replica, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(1)
    got, want = [], []
    for _ in range(steps):
        x = torch.randn(4, 8, generator=generator)
        engine.backward(engine(x.bfloat16()).float().pow(2).mean())
        grads = [p.grad.float() for p in engine.module.parameters()]
        engine.step()
        got.append(_masters(engine))
        for param, grad in zip(replica, grads):
            param.grad = grad
        reference.step()
        want.append([p.detach().clone() for p in replica])
    return start, got, want


def _check(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu
    from megatron.engine import fp16_optimizer_init

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)

    # DeepSpeed as is: a step was taken at construction
    engine = _engine(state)
    assert fp16_optimizer_init.needs_reset(engine.optimizer)
    steps = [float(s["step"]) for s in engine.optimizer.optimizer.state.values()]
    assert steps and all(step == 1.0 for step in steps), steps
    start, got, want = _train_and_replay(engine, steps=1)
    update, fresh = got[0][0] - start[0], want[0][0] - start[0]
    ratio = (update.flatten() / fresh.flatten()).median().item()
    assert abs(ratio - 0.744) < 0.01, f"first update / Adam's = {ratio:.4f}, expected ~0.744"

    # with the reset
    engine = _engine(state)
    fp16_optimizer_init.reset_initialization_step(engine.optimizer)
    assert len(engine.optimizer.optimizer.state) == 0
    for master, weight in zip(_masters(engine), engine.module.parameters()):
        assert torch.equal(master, weight.detach().float())
    start, got, want = _train_and_replay(engine, steps=3)
    for step, (g, w) in enumerate(zip(got, want)):
        for index, (a, b) in enumerate(zip(g, w)):
            assert torch.equal(a, b), f"step {step}, tensor {index}: differs from a fresh AdamW"
    assert not torch.equal(got[-1][0], start[0]), "the weights did not move"
    return "ok"


def test_fp16_unfused_optimizer_construction_step_is_undone():
    assert run_distributed(_check, 1, timeout=300) == ["ok"]
