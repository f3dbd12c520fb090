"""megatron/engine/optimizer_kind.py follows DeepSpeed's own choice of optimizer wrapper: DeepSpeed's
`DeepSpeedEngine._do_optimizer_sanity_check`, run on DeepSpeed's parsed config for every combination of
precision, gradient-sum dtype, ZeRO stage, CPU offload and pipeline engine, names the same wrapper."""

import itertools

import pytest
import torch

from megatron.engine.optimizer_kind import (BF16, FP16_UNFUSED, TORCH, ZERO_1_2, ZERO_3, deepspeed_optimizer_kind,
                                            optimizer_wrapper)
from megatron.neox_args import NeoXArgs

deepspeed = pytest.importorskip("deepspeed")


def _deepspeed_choice(precision, accum, stage, offload, pipeline) -> str:
    """The wrapper DeepSpeed's engine would build, from its own selection method and config parser."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
              "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
              "data_types": {"grad_accum_dtype": accum}}
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only the config-reading methods are used
    for name, value in (("_config", DeepSpeedConfig(config)), ("pipeline_parallelism", pipeline),
                        ("global_rank", 0)):
        object.__setattr__(engine, name, value)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    choice = engine._do_optimizer_sanity_check(optimizer)
    if choice == ZERO_OPTIMIZATION:
        return ZERO_3 if stage == 3 else ZERO_1_2
    if choice == constants.BFLOAT16:
        return BF16
    if choice in (constants.FP16, constants.DDP_BFLOAT16):
        return FP16_UNFUSED  # FP16_Optimizer only for DeepSpeed's FusedAdam; ours is torch's
    assert choice is None
    return TORCH


CASES = [case for case in itertools.product(("fp32", "bf16", "fp16"), ("fp32", "bf16", "fp16"), (0, 1, 2, 3),
                                            (False, True), (False, True))
         if not (case[0] == "fp32" and case[1] != "fp32")  # refused by our config check
         and not (case[2] == 0 and (case[1] != case[0] or case[3]))]  # idem; offload needs ZeRO >= 1


@pytest.mark.parametrize("precision, accum, stage, offload, pipeline", CASES)
def test_wrapper_is_deepspeeds_choice(precision, accum, stage, offload, pipeline, monkeypatch):
    import deepspeed.runtime.engine

    # its "untested optimizer" check logs through deepspeed.comm (no process group here); not part of the choice
    monkeypatch.setattr(deepspeed.runtime.engine, "is_zero_supported_optimizer", lambda optimizer: True)
    assert optimizer_wrapper(stage, precision, accum, offload, pipeline) == \
        _deepspeed_choice(precision, accum, stage, offload, pipeline)


def test_kind_of_a_config_names_the_settings():
    base = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8,
            "data_path": "data/bundled/pystdlib_text_document", "train_micro_batch_size_per_gpu": 1,
            "train_iters": 10, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
            "tokenizer_type": "ByteLevelTokenizer", "lr": 1e-3}
    on_device = deepspeed_optimizer_kind(NeoXArgs.from_dict(dict(base, zero_optimization={"stage": 1}),
                                                            world_size=1))
    offloaded = deepspeed_optimizer_kind(NeoXArgs.from_dict(
        dict(base, zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}}), world_size=1))
    assert on_device.wrapper == BF16 and offloaded.wrapper == ZERO_1_2
    assert str(on_device) == "BF16_Optimizer (ZeRO stage 1, bf16 weights, fp32 gradient sums, optimizer on the device)"
    assert "optimizer offloaded to the CPU" in str(offloaded)
    fp32 = deepspeed_optimizer_kind(NeoXArgs.from_dict(dict(base, bf16={"enabled": False}, data_types={}),
                                                       world_size=1))
    assert fp32.wrapper == TORCH
