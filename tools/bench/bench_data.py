"""The synthetic corpus both sides train on: random token ids in our mmap indexed-dataset format.

Written once (per vocabulary and size) with `megatron.data.indexed_dataset.IndexedDatasetBuilder`, then
read by our data loader (our side) or sliced straight from the `.bin` into pre-made batches (baselines).
Documents have random lengths so that our samples cross document boundaries as real data does.
"""

from __future__ import annotations

import os

import numpy as np

from megatron.data.indexed_dataset import (
    IndexedDatasetBuilder, MMapIndexedDataset, best_fitting_dtype, data_file_path, dataset_exists,
    index_file_path,
)

MIN_DOC_TOKENS = 256
MAX_DOC_TOKENS = 4096


def tokens_needed(micro_batch: int, seq_length: int, iterations: int, margin: float = 0.1) -> int:
    """Tokens for `iterations` micro-batches of `seq_length + 1` tokens, plus `margin` and one longest document.

    E.g. seq 2048, micro 8, 27 iterations: 27 * 8 * 2049 * 1.1 + 4096 ~ 0.49M tokens (~1 MB as uint16).
    """
    return int(iterations * micro_batch * (seq_length + 1) * (1.0 + margin)) + MAX_DOC_TOKENS


def ensure_synthetic_dataset(cache_dir: str, vocab_size: int, num_tokens: int, seed: int = 1234) -> str:
    """Prefix of a dataset of >= `num_tokens` uniform random ids in [0, vocab_size); built if missing.

    The name encodes vocabulary, size and seed, so a cached file is reused only when it fits. Files are
    written under temporary names and renamed, so an interrupted write never leaves a half dataset.
    """
    os.makedirs(cache_dir, exist_ok=True)
    prefix = os.path.join(cache_dir, f"synthetic_v{vocab_size}_n{num_tokens}_s{seed}")
    if dataset_exists(prefix):
        return prefix
    rng = np.random.default_rng(seed)
    dtype = best_fitting_dtype(vocab_size)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(data_file_path(tmp), dtype=dtype)
    written = 0
    while written < num_tokens:
        length = int(rng.integers(MIN_DOC_TOKENS, MAX_DOC_TOKENS + 1))
        builder.add_item(rng.integers(0, vocab_size, size=length, dtype=np.int64).astype(dtype))
        builder.end_document()
        written += length
    builder.finalize(index_file_path(tmp))
    os.replace(data_file_path(tmp), data_file_path(prefix))  # .bin first: dataset_exists needs both
    os.replace(index_file_path(tmp), index_file_path(prefix))
    return prefix


def token_batches(prefix: str, count: int, micro_batch: int, seq_length: int) -> np.ndarray:
    """`count` batches int64 `[count, micro_batch, seq_length]` cut back to back from the dataset's tokens
    (wrapping around when it is shorter), for the baselines' pre-generated inputs."""
    indexed = MMapIndexedDataset(prefix)
    stream = np.concatenate([indexed[i] for i in range(len(indexed))]).astype(np.int64)  # [n_tokens]
    need = count * micro_batch * seq_length
    if len(stream) < need:
        stream = np.tile(stream, -(-need // len(stream)))
    return stream[:need].reshape(count, micro_batch, seq_length)
