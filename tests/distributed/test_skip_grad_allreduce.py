"""`skip_allreduce_without_replicas` (megatron/engine/build.py): with one data-parallel replica the
engine's fallback gradient all-reduce is turned off, and training is bitwise the same as with it on in fp32
(a sum over one rank changes no value); it stays on where a ZeRO optimizer moves the gradients in that call.

One gloo rank, a two-layer MLP, AdamW, clipping 1.0, two micro-batches per step, three steps."""

from types import SimpleNamespace

import torch
from torch import nn

from tests.helpers.distributed import run_distributed


def _train(state, zero_stage: int, bf16: bool, fp32_accum: bool, skip: bool):
    import deepspeed

    from megatron.engine.build import skip_allreduce_without_replicas

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 1.0, "bf16": {"enabled": bf16}}
    if fp32_accum:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        # DeepSpeed all-reduces in the model's dtype by default, which rounds BF16_Optimizer's fp32
        # gradient sums to bf16 even over one rank; the skipped path keeps them fp32, as this does
        config["communication_data_type"] = "fp32"
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, mpu=state.deepspeed_mpu())
    skipped = skip_allreduce_without_replicas(engine, state) if skip else None
    calls = {"allreduce_gradients": 0, "buffered_allreduce_fallback": 0}
    for name in calls:  # count the engine's calls of both (instance attributes shadow the methods)
        def counted(*a, _name=name, _method=getattr(engine, name), **k):
            calls[_name] += 1
            return _method(*a, **k)
        setattr(engine, name, counted)
    generator = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if bf16 else torch.float32
    for _ in range(3 * 2):
        x = torch.randn(2, 8, generator=generator).to(dtype)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    params = [p.detach().float().clone() for p in engine.module.parameters()]
    return params, skipped, calls


def _initial_params():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    return [p.detach().float().clone() for p in module.parameters()]


def _check(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu
    from megatron.engine.build import skip_allreduce_without_replicas

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    assert state.dp_size == 1
    # the engine's generic fallback: stage 0 (fp32 and bf16) and BF16_Optimizer at stage 1
    for zero_stage, bf16, fp32_accum in ((0, False, False), (0, True, False), (1, True, True)):
        reference, _, reference_calls = _train(state, zero_stage, bf16, fp32_accum, skip=False)
        params, skipped, calls = _train(state, zero_stage, bf16, fp32_accum, skip=True)
        case = f"ZeRO {zero_stage}, bf16={bf16}, fp32 accumulation={fp32_accum}"
        assert skipped is True, case
        # on: one fallback reduction per step (at the accumulation boundary); off: none at all
        assert reference_calls == {"allreduce_gradients": 6, "buffered_allreduce_fallback": 3}, (case, reference_calls)
        assert calls == {"allreduce_gradients": 0, "buffered_allreduce_fallback": 0}, (case, calls)
        for got, want in zip(params, reference):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=case)
        initial = _initial_params()
        assert any(not torch.equal(p, q) for p, q in zip(params, initial)), f"{case}: nothing trained"
    # ZeRO's own optimizers take the gradients into their partitions in that call: it stays on
    for zero_stage, bf16, fp32_accum in ((1, True, False), (1, False, False), (2, False, False)):
        _, skipped, calls = _train(state, zero_stage, bf16, fp32_accum, skip=True)
        assert skipped is False and calls["allreduce_gradients"] == 6, (zero_stage, bf16, fp32_accum, calls)
    return "ok"


def test_single_replica_skips_the_fallback_allreduce_and_trains_bitwise_the_same():
    assert run_distributed(_check, 1, timeout=300) == ["ok"]


def test_several_replicas_keep_the_allreduce():
    from megatron.engine.build import skip_allreduce_without_replicas

    # with dp > 1 the engine is not even looked at
    assert skip_allreduce_without_replicas(engine=None, parallel=SimpleNamespace(dp_size=2)) is False
