"""megatron/training/bf16_clipping.py against DeepSpeed's own functions.

- Inside a real BF16_Optimizer (bf16 weights, fp32 gradient accumulation, ZeRO 1, one gloo rank, AdamW,
  two micro-batches per step, four steps): the fp32 master weights and the reported gradient norm equal
  DeepSpeed's, bitwise when no clipping happens and within 1e-6 relative when it does (the norm's sum
  runs in another order); a step whose gradients hold an inf is skipped by both, the weights untouched.
- Over a tensor-parallel group of 2 ranks: the global norm equals DeepSpeed's (rel 1e-6), and a non-finite
  norm on one rank gives the -1 sentinel on both.
"""

import math

import torch
from torch import nn

from tests.helpers.distributed import run_distributed


def _train(state, clipping: float, ours: bool, poison_step: int | None = None):
    import deepspeed

    from megatron.training import bf16_clipping

    bf16_clipping.install() if ours else bf16_clipping.uninstall()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": clipping, "bf16": {"enabled": True},
              "data_types": {"grad_accum_dtype": "fp32"}}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, mpu=state.deepspeed_mpu())
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    generator = torch.Generator().manual_seed(1)
    masters, norms = [], []
    for step in range(4):
        for _ in range(2):
            x = torch.randn(4, 8, generator=generator)
            if step == poison_step:
                x[0, 0] = math.inf
            engine.backward(engine(x.bfloat16()).float().pow(2).mean())
            engine.step()
        masters.append(torch.cat([p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition]))
        norms.append(float(engine.get_global_grad_norm()))
    bf16_clipping.uninstall()
    return masters, norms


def _check_engine(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    for clipping, exact in ((100.0, True), (0.05, False)):
        want, want_norms = _train(state, clipping, ours=False)
        got, got_norms = _train(state, clipping, ours=True)
        assert all(n > 0.05 for n in want_norms), want_norms  # at 0.05 every step clips
        for step, (g, w) in enumerate(zip(got, want)):
            tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-7}
            torch.testing.assert_close(g, w, **tolerance, msg=f"clipping {clipping}, step {step}")
        assert got_norms == want_norms if exact else all(
            math.isclose(g, w, rel_tol=1e-6) for g, w in zip(got_norms, want_norms)), (got_norms, want_norms)
    # an inf in step 1's gradients: both skip that step (weights as after step 0)
    want, _ = _train(state, 1.0, ours=False, poison_step=1)
    got, _ = _train(state, 1.0, ours=True, poison_step=1)
    for masters in (want, got):
        assert torch.equal(masters[1], masters[0])
        assert not torch.equal(masters[2], masters[1])
    torch.testing.assert_close(got[3], want[3], rtol=1e-6, atol=1e-7)
    return "ok"


def test_bf16_optimizer_steps_match_deepspeeds_norm_and_clipping():
    assert run_distributed(_check_engine, 1, timeout=300) == ["ok"]


def _check_tensor_parallel_norm(rank, world_size):
    import deepspeed
    from deepspeed.runtime.utils import get_global_norm_of_tensors

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over the existing group
    from megatron import mpu
    from megatron.training.bf16_clipping import global_grad_norm

    state = mpu.initialize_model_parallel(2)
    torch.manual_seed(rank)
    tensors = [torch.randn(17, 5), torch.randn(300), torch.randn(3, 4).bfloat16()]
    want = get_global_norm_of_tensors(tensors, mpu=state.deepspeed_mpu())
    got = global_grad_norm(tensors, mpu=state.deepspeed_mpu())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    if rank == 1:
        tensors[1][7] = math.nan
    assert global_grad_norm(tensors, mpu=state.deepspeed_mpu()).item() == -1.0
    return "ok"


def test_global_norm_over_a_tensor_parallel_group_matches_deepspeed():
    assert run_distributed(_check_tensor_parallel_norm, 2, timeout=240) == ["ok", "ok"]
