"""A DeepSpeed engine built from our DeepSpeed config never synchronizes the device inside training steps.

DeepSpeed's throughput timer is on by default and calls the accelerator's `synchronize()` at every forward
and every `engine.step()`: the host then waits for the device twice per micro-batch, which on an H100
left the GPU idle ~6 ms of a 100 ms 410M step. `NeoXArgs.deepspeed_config()` turns it off. Here the
accelerator's `synchronize` is counted over training steps (bf16, fp32 accumulation: BF16_Optimizer with
our patches; two micro-batches per step), once with our config and once with DeepSpeed's default timer,
which must count (so the counter sees what it should).
"""

import torch
from torch import nn

from tests.helpers.distributed import run_distributed


def _count_synchronizations(state, config: dict) -> int:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from megatron.engine import bf16_optimizer_patches

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3),
                                      config=config, mpu=state.deepspeed_mpu())
    bf16_optimizer_patches.install()
    accelerator = get_accelerator()
    calls = []
    original = accelerator.synchronize
    accelerator.synchronize = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    try:
        for _ in range(5 * config["gradient_accumulation_steps"]):
            loss = engine(torch.randn(4, 8).bfloat16()).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
    finally:
        accelerator.synchronize = original
        bf16_optimizer_patches.uninstall()
    return len(calls)


def _check(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu
    from megatron.neox_args import NeoXArgs

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    args = NeoXArgs.from_dict({"data_path": "data/bundled/x", "train_micro_batch_size_per_gpu": 4, "lr": 1e-3,
                               "tokenizer_type": "ByteLevelTokenizer",
                               "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
                               "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}, world_size=1)
    ours = args.deepspeed_config()
    deepspeed_default = {key: value for key, value in ours.items() if key != "timers"}
    return _count_synchronizations(state, ours), _count_synchronizations(state, deepspeed_default)


def test_engine_steps_never_synchronize_the_device():
    [(ours, deepspeed_default)] = run_distributed(_check, 1, timeout=300)
    assert deepspeed_default > 0, "the counter saw no synchronize even with DeepSpeed's timer on"
    assert ours == 0, f"{ours} device synchronizations in 10 micro-batches with our DeepSpeed config"
