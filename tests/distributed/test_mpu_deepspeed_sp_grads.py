"""Sequence-parallel gradient sums inside a real DeepSpeed engine (2 gloo ranks, tp=2, SP, two
micro-batches of gradient accumulation, SGD lr=1, no clipping): the method `grad_sync_mode` picks
for each ZeRO stage gives the exact update, and the once-per-step method refuses to run silently
where DeepSpeed has already taken the gradients (stage 1). Tolerance 1e-5 absolute (fp32)."""

import torch
from torch import nn

from megatron import mpu
from megatron.mpu.grads import REDUCTION_COUNTER, grad_sync_mode
from tests.helpers.distributed import run_distributed


class _MarkedAndPlain(nn.Module):
    def __init__(self):
        super().__init__()
        self.marked = nn.Parameter(torch.zeros(4))
        self.plain = nn.Parameter(torch.zeros(4))
        self.plain.tensor_model_parallel = True  # a per-rank shard (DeepSpeed's grad norm counts it on every rank)
        mpu.mark_sequence_parallel_param(self.marked)

    def forward(self, c):
        return (self.marked * c).sum() + (self.plain * c).sum()


def _train_one_step(state, zero_stage, mode, contributions, rank, bf16=False, fp32_accum=False):
    import deepspeed

    module = _MarkedAndPlain()
    if mode == "hooks":
        mpu.register_sequence_parallel_grad_hooks(module, state)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "bf16": {"enabled": bf16}}
    if fp32_accum:  # bf16 weights, fp32 gradient buffers: DeepSpeed's BF16_Optimizer at ZeRO 1
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
                                      config=config, mpu=state.deepspeed_mpu())
    for k in range(2):
        engine.backward(engine(contributions[rank, k].to(next(engine.module.parameters()).dtype)))
        if mode == "once_per_step" and engine.is_gradient_accumulation_boundary():
            assert mpu.allreduce_sequence_parallel_grads(engine.module, state) == 1
        engine.step()
    return module


def _check(rank, world_size):
    import logging

    import deepspeed
    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(2, sequence_parallel=True)
    torch.manual_seed(0)
    contributions = torch.randn(2, 2, 4)                # [tp rank, micro-batch, 4]
    expected_marked = -contributions.sum((0, 1)) / 2    # SGD lr 1 on the gas-averaged, tp-summed grad
    expected_plain = -contributions[rank].sum(0) / 2
    for zero_stage in (0, 1, 2):
        mode = grad_sync_mode(zero_stage)
        module = _train_one_step(state, zero_stage, mode, contributions, rank)
        torch.testing.assert_close(module.marked.detach(), expected_marked, rtol=0, atol=1e-5,
                                   msg=f"marked param, ZeRO {zero_stage}, {mode}")
        torch.testing.assert_close(module.plain.detach(), expected_plain, rtol=0, atol=1e-5,
                                   msg=f"plain param, ZeRO {zero_stage}, {mode}")
        assert getattr(module.marked, REDUCTION_COUNTER) == (1 if mode == "once_per_step" else 2)
    # bf16 at ZeRO 0 (DeepSpeed's mixed-precision wrapper): grad_sync_mode picks the hooks, which give
    # the exact update there too (inputs rounded to bf16 first; tolerance covers bf16 parameter rounding)
    assert grad_sync_mode(0, "bf16") == "hooks"
    bf16_contributions = contributions.bfloat16().float()
    module = _train_one_step(state, 0, "hooks", bf16_contributions, rank, bf16=True)
    torch.testing.assert_close(module.marked.detach().float(), -bf16_contributions.sum((0, 1)) / 2,
                               rtol=0, atol=2e-2, msg="marked param, ZeRO 0, bf16, hooks")
    # bf16 with fp32 gradient accumulation at ZeRO 1 (the shipped configs' setup): the hooks sum each
    # micro-batch's grad before BF16_Optimizer copies it into its fp32 buffer
    assert grad_sync_mode(1, "bf16") == "hooks"
    module = _train_one_step(state, 1, "hooks", bf16_contributions, rank, bf16=True, fp32_accum=True)
    torch.testing.assert_close(module.marked.detach().float(), -bf16_contributions.sum((0, 1)) / 2,
                               rtol=0, atol=2e-2, msg="marked param, ZeRO 1, bf16 + fp32 accumulation, hooks")
    torch.testing.assert_close(module.plain.detach().float(), -bf16_contributions[rank].sum(0) / 2,
                               rtol=0, atol=2e-2, msg="plain param, ZeRO 1, bf16 + fp32 accumulation, hooks")
    try:
        _train_one_step(state, 1, "once_per_step", contributions, rank)
    except RuntimeError as exc:
        assert "register_sequence_parallel_grad_hooks" in str(exc)
    else:
        raise AssertionError("the once-per-step sum under ZeRO 1 must raise (the grads are gone)")
    return "ok"


def test_sequence_parallel_grads_in_deepspeed_engine_zero_0_1_2():
    assert run_distributed(_check, 2, timeout=240) == ["ok", "ok"]
