"""megatron/engine/multi_tensor_add.py's Triton kernel on the GPU: bit for bit torch's fp32 + upcast add,
for bf16 and fp16 addends, over sizes that end inside a block, span several chunks or are empty; a call
with tensors it cannot take (a non-contiguous one) goes to torch's foreach add and is still right."""

import pytest
import torch

from megatron.engine import multi_tensor_add

pytestmark = pytest.mark.gpu

SIZES = (1, 1023, 2048, multi_tensor_add.CHUNK + 7, 3 * multi_tensor_add.CHUNK, 0, 4096 * 1024 + 3)


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them with -m gpu on the GPU machine)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_is_torch_bit_for_bit(dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    sums = [torch.randn(n, device="cuda", generator=generator) * 100 for n in SIZES]
    want = [s.clone() for s in sums]
    assert multi_tensor_add._kernel() is not None, "Triton is missing on the GPU machine"
    for micro_batch in range(3):  # new addend tensors each time, as autograd allocates them
        addends = [torch.randn(n, device="cuda", generator=generator).to(dtype) for n in SIZES]
        assert multi_tensor_add._fast_path(sums, addends)
        multi_tensor_add.add_(sums, addends)
        for expected, addend in zip(want, addends):
            expected.add_(addend.float())
        del addends
    torch.cuda.synchronize()
    for index, (got, expected) in enumerate(zip(sums, want)):
        assert torch.equal(got, expected), f"tensor {index} ({SIZES[index]} elements) differs"


def test_non_contiguous_pairs_take_torchs_path():
    sums = [torch.zeros(64, 64, device="cuda").t(), torch.zeros(10, device="cuda")]
    addends = [torch.ones(64, 64, device="cuda", dtype=torch.bfloat16), torch.ones(10, device="cuda").bfloat16()]
    assert not multi_tensor_add._fast_path(sums, addends)
    multi_tensor_add.add_(sums, addends)
    assert all(torch.equal(s, torch.ones_like(s)) for s in sums)
