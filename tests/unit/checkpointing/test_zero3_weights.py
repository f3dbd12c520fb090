"""megatron/checkpointing/zero3.py: the key and shape check run before full weights go into ZeRO-3
partitions (the copy itself runs end to end in tests/e2e/test_zero_e2e.py)."""

import pytest
import torch
from torch import nn

from megatron.checkpointing import CheckpointError
from megatron.checkpointing.zero3 import check_state_matches, full_shape


def _module():
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def test_a_matching_state_passes():
    module = _module()
    check_state_matches(module, {k: v.clone() for k, v in module.state_dict().items()}, "ckpt/global_step4")


def test_missing_unexpected_and_misshapen_keys_are_all_named():
    module = _module()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    del state["1.bias"]
    state["2.weight"] = torch.zeros(3)
    state["0.weight"] = torch.zeros(3, 5)
    with pytest.raises(CheckpointError) as err:
        check_state_matches(module, state, "ckpt/global_step4")
    message = str(err.value)
    assert "ckpt/global_step4" in message
    assert "missing: 1.bias" in message and "not in the model: 2.weight" in message
    assert "0.weight: checkpoint (3, 5), model (3, 4)" in message


def test_full_shape_reads_zero3s_recorded_shape():
    param = nn.Parameter(torch.empty(0))  # what a ZeRO-3 partitioned parameter looks like locally
    param.ds_shape = torch.Size([3, 4])
    assert full_shape(param) == (3, 4)
    assert full_shape(nn.Parameter(torch.empty(2, 2))) == (2, 2)
