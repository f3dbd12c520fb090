"""megatron/engine/multi_tensor_add.py on CPU: the chunk table that cuts the pairs for the Triton kernel,
and `add_` (torch's foreach add here; the kernel itself is checked bit for bit on the GPU in
tests/gpu/test_gpu_multi_tensor_add.py)."""

import pytest
import torch

from megatron.engine import multi_tensor_add


def test_chunk_table_covers_every_element_once():
    chunk = multi_tensor_add.CHUNK
    numels = (5, 0, 2 * chunk + 1, chunk)
    pairs, starts, numels_out = multi_tensor_add._chunk_table(numels, torch.device("cpu"))
    assert pairs.tolist() == [0, 2, 2, 2, 3]  # the empty tensor has no chunk
    assert starts.tolist() == [0, 0, chunk, 2 * chunk, 0]
    assert numels_out.tolist() == list(numels)
    # every element of every tensor lies in exactly one chunk [start, start + CHUNK) of its own pair
    for index, numel in enumerate(numels):
        covered = sorted(e for p, s in zip(pairs.tolist(), starts.tolist()) if p == index
                         for e in range(s, min(s + chunk, numel)))
        assert covered == list(range(numel))


def test_add_matches_torch_on_cpu_and_checks_lengths():
    generator = torch.Generator().manual_seed(0)
    sums = [torch.randn(n, generator=generator) for n in (3, 70_000, 1)]
    addends = [torch.randn(n, generator=generator).bfloat16() for n in (3, 70_000, 1)]
    want = [s + a.float() for s, a in zip(sums, addends)]
    assert not multi_tensor_add._fast_path(sums, addends)  # CPU tensors: torch's foreach add
    multi_tensor_add.add_(sums, addends)
    for got, expected in zip(sums, want):
        assert torch.equal(got, expected)
    multi_tensor_add.add_([], [])  # nothing to do
    with pytest.raises(ValueError, match="as many sums as addends"):
        multi_tensor_add.add_(sums, addends[:2])
