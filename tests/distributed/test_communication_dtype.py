"""`communication_data_type` (PrecisionArgs) reaches DeepSpeed and decides whether fp32 gradient sums
stay fp32 across data-parallel replicas.

bf16 weights with fp32 gradient accumulation (BF16_Optimizer, ZeRO 1), SGD, clipping off, three steps of a
global batch of two micro-batches: on two data-parallel gloo ranks (one micro-batch each) the fp32 master
weights are bit for bit those of one rank accumulating both micro-batches when the replicas sum in fp32
(the same fp32 sums, divided by a power of two); summing in bf16 (DeepSpeed's default) rounds them and
the weights differ.
"""

import torch
from torch import nn

from tests.helpers.distributed import run_distributed


def _train(rank, world_size, communication_data_type):
    import logging

    import deepspeed

    from megatron import mpu

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)  # data-parallel size = world size
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2 // world_size,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    if communication_data_type:
        config["communication_data_type"] = communication_data_type
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5),
                                      config=config, mpu=state.deepspeed_mpu())
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        global_batch = [torch.randn(4, 8, generator=generator) for _ in range(2)]
        for x in (global_batch if world_size == 1 else [global_batch[rank]]):
            engine.backward(engine(x.bfloat16()).float().pow(2).mean())
            engine.step()
    # this rank's slice of the flat fp32 master weights (ZeRO 1 partitions it over the replicas)
    return torch.cat([p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition])


def _masters(world_size, communication_data_type, numel):
    parts = run_distributed(_train, world_size, communication_data_type, timeout=240)
    return torch.cat(parts)[:numel]  # partitions in rank order, alignment padding dropped


def test_fp32_communication_keeps_fp32_sums_exact_and_bf16_rounds_them():
    numel = 8 * 64 + 64 + 64 * 8 + 8
    # one replica summing both micro-batches; DeepSpeed's "all-reduce" over one rank in fp32 changes nothing
    # (in bf16 it would round, which `skip_allreduce_without_replicas` avoids in our engine)
    reference = _masters(1, "fp32", numel)
    fp32 = _masters(2, "fp32", numel)
    bf16 = _masters(2, None, numel)
    assert torch.equal(fp32, reference)
    assert not torch.equal(bf16, reference)
    torch.testing.assert_close(bf16, reference, rtol=0, atol=1e-2)  # rounded, not wrong
