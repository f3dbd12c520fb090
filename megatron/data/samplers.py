"""Megatron's pretraining batch sampler: which global samples each data-parallel rank reads.

Global sample indices are taken in consecutive chunks of `micro_batch_size * dp_size`; rank r reads the
r-th `micro_batch_size` slice of each chunk. So the k-th micro-batch of rank r is samples
`consumed + k * micro * dp + r * micro + [0, micro)`. One optimizer step reads
`micro * grad_acc * dp` consecutive samples whatever the split between grad_acc and dp, and resuming at
`consumed_samples` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

from typing import Iterator


class PretrainingSampler:
    """Yields lists of `micro_batch_size` sample indices for one data-parallel rank (a batch_sampler).

    Incomplete trailing chunks are dropped, so every rank yields the same number of micro-batches; with
    consumed_samples == total_samples it yields nothing.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler setup: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} must be in [0, total_samples={total_samples}]")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.chunk = micro_batch_size * dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.chunk

    def __iter__(self) -> Iterator[list[int]]:
        first = self.dp_rank * self.micro_batch_size
        for chunk_start in range(self.consumed_samples, self.total_samples - self.chunk + 1, self.chunk):
            start = chunk_start + first
            yield list(range(start, start + self.micro_batch_size))
