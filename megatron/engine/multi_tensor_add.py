"""fp32 sums += half-precision tensors, every pair in one kernel launch.

Gradient accumulation in BF16_Optimizer adds each micro-batch's bf16 parameter gradients into fp32 sums
(`bf16_optimizer_patches.update_hp_grads`). torch's `_foreach_add_` has no multi-tensor kernel for mixed
dtypes: it falls back to one elementwise kernel per tensor pair, which on an H100 moved the 410M model's
4 GB (read fp32 and bf16, write fp32) at ~1 TB/s, 3.5 ms per micro-batch (12 ms at 1.3B).

`add_(sums, addends)` does the same arithmetic (each addend upcast to fp32, one fp32 addition per element,
so the result is bit for bit torch's) in one Triton kernel over all pairs:

    for every pair i, every element j:   sums[i][j] = sums[i][j] + float32(addends[i][j])

The work is cut into chunks of CHUNK elements (a pair's last chunk may be short); program c handles chunk c
of pair `chunk_pair[c]` from element `chunk_start[c]`. The chunk table depends only on the tensor sizes and
is cached on the device; the tensors' addresses change every micro-batch (autograd allocates new gradients)
and go to the device with each call as one small pinned, non-blocking copy. Elsewhere (CPU, no Triton,
other dtypes, non-contiguous tensors) `add_` is `torch._foreach_add_`.
"""

from __future__ import annotations

import functools

import torch

CHUNK = 65536  # elements per program: a few thousand programs for a 400M-parameter model
BLOCK = 2048  # elements per loop iteration of one program
_ADDEND_DTYPES = (torch.bfloat16, torch.float16)


def add_(sums: list[torch.Tensor], addends: list[torch.Tensor]) -> None:
    """sums[i] += addends[i] for every i (in place; fp32 sums, addends upcast). One launch on CUDA."""
    if len(sums) != len(addends):
        raise ValueError(f"add_ needs as many sums as addends, got {len(sums)} and {len(addends)}")
    if not sums:
        return
    if _fast_path(sums, addends):
        _triton_add_(sums, addends)
    else:
        torch._foreach_add_(sums, addends)


def _fast_path(sums: list[torch.Tensor], addends: list[torch.Tensor]) -> bool:
    first = sums[0]
    if not first.is_cuda or _kernel() is None:
        return False
    dtype, device = addends[0].dtype, first.device
    return dtype in _ADDEND_DTYPES and all(
        s.dtype == torch.float32 and a.dtype == dtype and s.device == device and a.device == device
        and s.numel() == a.numel() and s.is_contiguous() and a.is_contiguous()
        for s, a in zip(sums, addends))


def _triton_add_(sums: list[torch.Tensor], addends: list[torch.Tensor]) -> None:
    device = sums[0].device
    numels = tuple(s.numel() for s in sums)
    chunk_pair, chunk_start, numels_on_device = _chunk_table(numels, device)
    if chunk_pair.numel() == 0:  # every tensor is empty
        return
    addresses = torch.tensor([[s.data_ptr() for s in sums], [a.data_ptr() for a in addends]],
                             dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    kernel, triton_dtypes = _kernel()
    kernel[(chunk_pair.numel(),)](
        addresses[0], addresses[1], numels_on_device, chunk_pair, chunk_start,
        CHUNK=CHUNK, BLOCK=BLOCK, ADDEND_DTYPE=triton_dtypes[addends[0].dtype],
    )


@functools.lru_cache(maxsize=16)
def _chunk_table(numels: tuple[int, ...], device: torch.device):
    """(pair index int32 [chunks], first element int64 [chunks], numels int64 [pairs]) on `device`."""
    pairs, starts = [], []
    for index, numel in enumerate(numels):
        for start in range(0, numel, CHUNK):
            pairs.append(index)
            starts.append(start)
    return (torch.tensor(pairs, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device),
            torch.tensor(numels, dtype=torch.int64, device=device))


@functools.lru_cache(maxsize=1)
def _kernel():
    """(the Triton kernel, {torch dtype: triton dtype}), or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def multi_tensor_add_kernel(sum_addresses, addend_addresses, numels, chunk_pair, chunk_start,
                                CHUNK: tl.constexpr, BLOCK: tl.constexpr, ADDEND_DTYPE: tl.constexpr):
        chunk = tl.program_id(0)
        pair = tl.load(chunk_pair + chunk)
        start = tl.load(chunk_start + chunk)
        numel = tl.load(numels + pair)
        sums = tl.load(sum_addresses + pair).to(tl.pointer_type(tl.float32))
        addends = tl.load(addend_addresses + pair).to(tl.pointer_type(ADDEND_DTYPE))
        for offset in range(0, CHUNK, BLOCK):
            index = start + offset + tl.arange(0, BLOCK)  # int64: tensors may exceed 2**31 elements
            inside = index < numel
            total = tl.load(sums + index, mask=inside) + tl.load(addends + index, mask=inside).to(tl.float32)
            tl.store(sums + index, total, mask=inside)

    return multi_tensor_add_kernel, {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
