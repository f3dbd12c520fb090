"""fused_adamw.GradLayout: the program table of the kernel that reads each bf16 gradient where it lies
(bf16_optimizer_patches item 6). The kernel itself runs on the GPU (tests/gpu/test_gpu_fused_adamw.py)."""

import pytest
import torch

from megatron.engine import fused_adamw
from megatron.engine.fused_adamw import BLOCK, GradLayout


def test_every_element_of_every_parameter_is_read_by_exactly_one_program():
    numels = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5]
    offsets = [0, 16, 16 + BLOCK, 16 + 3 * BLOCK, 16 + 5 * BLOCK]  # gaps: alignment padding no program reads
    layout = GradLayout(offsets, numels, torch.device("cpu"))
    assert layout.num_blocks == sum(-(-n // BLOCK) for n in numels) == 1 + 1 + 1 + 2 + 4
    covered = torch.zeros(offsets[-1] + numels[-1] + 7, dtype=torch.int64)
    for tensor, start in zip(layout.block_tensor.tolist(), layout.block_start.tolist()):
        assert start % BLOCK == 0
        local = torch.arange(start, start + BLOCK)
        local = local[local < layout.tensor_numel[tensor]]  # the kernel's mask
        covered[layout.tensor_offset[tensor] + local] += 1
    expected = torch.zeros_like(covered)
    for offset, numel in zip(offsets, numels):
        expected[offset:offset + numel] = 1
    assert torch.equal(covered, expected)
    assert layout.end == offsets[-1] + numels[-1]
    assert not layout.aligned  # sizes 1, 1023, ... are not multiples of ALIGN: the kernel takes no vector hints
    assert GradLayout([0, 1024, 1040], [1024, 16, 48], torch.device("cpu")).aligned
    assert not GradLayout([0, 1032], [1032, 16], torch.device("cpu")).aligned  # 1032 = 64 x 16 + 8


def test_a_layout_must_fit_its_flat_parameter():
    with pytest.raises(ValueError, match="2 offsets for 1 parameters"):
        GradLayout([0, 4], [4], torch.device("cpu"))
    param = torch.nn.Parameter(torch.zeros(8))
    optimizer = torch.optim.AdamW([param])
    target = [[torch.zeros(8, dtype=torch.bfloat16)]]
    # on this CPU machine `applies` is False (the kernel is CUDA's), so no layout applies either
    assert not fused_adamw.gathered_applies(optimizer, target, [GradLayout([0], [8], torch.device("cpu"))])
