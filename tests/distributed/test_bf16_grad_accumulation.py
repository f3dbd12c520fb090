"""megatron/training/bf16_grad_accumulation.py inside a real BF16_Optimizer (bf16 weights, fp32 gradient
accumulation, ZeRO 1, one gloo rank, AdamW, clipping 1.0, three micro-batches per step, three steps): the
fp32 gradient sums, the fp32 master weights and the bf16 weights are bit for bit DeepSpeed's own, with
its default accumulation after backward and with `bf16.immediate_grad_update` (which keeps DeepSpeed's
path)."""

import torch
from torch import nn

from tests.helpers.distributed import run_distributed


def _train(state, ours: bool, immediate: bool):
    import deepspeed

    from megatron.training import bf16_grad_accumulation

    bf16_grad_accumulation.install() if ours else bf16_grad_accumulation.uninstall()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4), nn.LayerNorm(4))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 1.0, "bf16": {"enabled": True, "immediate_grad_update": immediate},
              "data_types": {"grad_accum_dtype": "fp32"}}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2),
                                      config=config, mpu=state.deepspeed_mpu())
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    generator = torch.Generator().manual_seed(1)
    grad_sums, masters = [], []
    for step in range(3):
        for micro in range(3):
            x = torch.randn(4, 8, generator=generator)
            engine.backward(engine(x.bfloat16()).float().pow(2).mean())
            if micro == 2:  # the fp32 sums the optimizer is about to use
                grad_sums.append(torch.cat([g.clone() for g in engine.optimizer.fp32_groups_gradients_flat]))
            engine.step()
        masters.append(torch.cat([p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition]))
    weights = [p.detach().clone() for p in engine.module.parameters()]
    bf16_grad_accumulation.uninstall()
    return grad_sums, masters, weights


def _check(rank, world_size):
    import logging

    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from megatron import mpu
    from megatron.training import bf16_grad_accumulation

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    original = BF16_Optimizer.update_hp_grads
    assert bf16_grad_accumulation.install() and BF16_Optimizer.update_hp_grads is bf16_grad_accumulation.update_hp_grads
    assert bf16_grad_accumulation.install()  # idempotent: the original is still DeepSpeed's
    bf16_grad_accumulation.uninstall()
    assert BF16_Optimizer.update_hp_grads is original
    for immediate in (False, True):
        want = _train(state, ours=False, immediate=immediate)
        got = _train(state, ours=True, immediate=immediate)
        for name, got_list, want_list in zip(("fp32 gradient sums", "fp32 masters", "bf16 weights"), got, want):
            for index, (g, w) in enumerate(zip(got_list, want_list)):
                assert torch.equal(g, w), f"{name} [{index}] differ (immediate_grad_update={immediate})"
        assert any(s.abs().sum() > 0 for s in got[0]), "no gradient reached the fp32 buffer"
    return "ok"


def test_bf16_optimizer_accumulation_is_bitwise_deepspeeds():
    assert run_distributed(_check, 1, timeout=300) == ["ok"]
