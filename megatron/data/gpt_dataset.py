"""GPT pretraining samples of `seq_length + 1` tokens cut from a stream of shuffled documents.

Three index arrays define the samples (all built vectorized in numpy, cached by `megatron.data.cache`):

- document index `doc_idx` `[num_epochs * n_docs]`: the documents of the split, each epoch an independent
  random permutation, epochs concatenated. Reading the documents in this order gives one token stream.
- sample index `sample_idx` `[n_samples + 1, 2]`: row i = (position in doc_idx, token offset in that
  document) of stream position `i * seq_length`. Sample i is stream positions
  `[i * seq_length, (i + 1) * seq_length]` (inclusive: seq_length + 1 tokens), so consecutive samples share
  one token and samples cross document boundaries. With `cum` = [0, cumsum(doc sizes in doc_idx order)],
  row i is `d = searchsorted(cum, p, side="right") - 1`, `offset = p - cum[d]` (empty documents are skipped).
- shuffle index `shuffle_idx` `[n_samples]`: a random order of the samples that keeps epochs apart
  (every sample starting in epoch e comes before any sample starting in epoch e + 1), so a partial last
  epoch does not let some documents be seen twice before others are seen once.

`num_epochs` is the least number of passes whose stream holds `num_samples` samples:
`num_epochs * tokens_per_epoch - 1 >= num_samples * seq_length`. All randomness comes from
`np.random.default_rng([seed, 0])` (documents) and `[seed, 1]` (samples): the same seed gives the same
sample order.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from megatron.data.cache import cached_arrays
from megatron.data.indexed_dataset import MMapIndexedDataset


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Least E with (E * tokens_per_epoch - 1) // seq_length >= num_samples."""
    if tokens_per_epoch <= 0:
        raise ValueError("cannot draw samples from a split with no tokens")
    needed_tokens = num_samples * seq_length + 1
    return max(1, -(-needed_tokens // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Each epoch an independent permutation of `documents`; returns int64 `[num_epochs * n_docs]`."""
    keys = rng.random((num_epochs, len(documents)))  # [E, n_docs]
    order = np.argsort(keys, axis=1, kind="stable")  # [E, n_docs] a permutation per row
    return np.asarray(documents, dtype=np.int64)[order].reshape(-1)


def build_sample_idx(doc_sizes_in_order: np.ndarray, seq_length: int) -> np.ndarray:
    """Start (doc_idx position, offset) of every sample the stream holds, plus the end of the last one.

    `doc_sizes_in_order` `[len(doc_idx)]`: token count of each document in stream order.
    Returns int64 `[n_samples + 1, 2]`, n_samples = (total_tokens - 1) // seq_length.
    """
    cum = np.zeros(len(doc_sizes_in_order) + 1, dtype=np.int64)  # [n + 1]
    np.cumsum(doc_sizes_in_order, dtype=np.int64, out=cum[1:])
    n_samples = (int(cum[-1]) - 1) // seq_length
    positions = np.arange(n_samples + 1, dtype=np.int64) * seq_length  # [n_samples + 1]
    doc_pos = np.searchsorted(cum, positions, side="right") - 1  # [n_samples + 1]
    return np.stack([doc_pos, positions - cum[doc_pos]], axis=1)


def build_shuffle_idx(sample_idx: np.ndarray, n_docs_per_epoch: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the samples, shuffled within each epoch, epochs in order. int64 `[n_samples]`.

    The sort key of a sample is `epoch + u` with u uniform in [0, 1): epochs stay in order and each epoch
    is uniformly permuted (float64 keeps >= 40 random bits next to any realistic epoch number).
    """
    start_doc_pos = sample_idx[:-1, 0]  # [n_samples]
    epoch_of_sample = start_doc_pos // max(n_docs_per_epoch, 1)
    keys = epoch_of_sample.astype(np.float64) + rng.random(len(start_doc_pos))
    return np.argsort(keys, kind="stable").astype(np.int64)


class GPTDataset(torch.utils.data.Dataset):
    """Samples `{"text": int64 [seq_length + 1]}` from the documents `documents` of an indexed dataset.

    `len(self)` is every sample of the epochs built (>= num_samples); item i is the i-th in shuffled order.
    """

    def __init__(
        self,
        name: str,
        indexed: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        if len(documents) == 0:
            raise ValueError(f"dataset {name!r} has no documents")
        self.name = name
        self.indexed = indexed
        self.seq_length = seq_length
        documents = np.asarray(documents, dtype=np.int64)
        sizes = indexed.sizes
        tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
        num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)

        def build():
            # two independent streams: the first epochs' document order and sample keys then do not depend
            # on num_epochs, so asking for more samples later keeps the earlier order (up to the one
            # sample that straddles the old end of the stream)
            doc_idx = build_doc_idx(documents, num_epochs, np.random.default_rng([seed, 0]))
            sizes_in_order = sizes[doc_idx]
            sample_idx = build_sample_idx(sizes_in_order, seq_length)
            shuffle_idx = build_shuffle_idx(sample_idx, len(documents), np.random.default_rng([seed, 1]))
            return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

        params = {
            "data": os.path.abspath(indexed.prefix),
            "split": name,
            "documents_sha": hashlib.sha256(documents.tobytes() + sizes[documents].tobytes()).hexdigest(),
            "num_epochs": num_epochs,
            "seq_length": seq_length,
            "seed": seed,
            "format": 1,
        }
        cache_dir = cache_dir or os.path.dirname(os.path.abspath(indexed.prefix))
        base = os.path.basename(indexed.prefix)
        arrays = cached_arrays(cache_dir, f"{base}_{name}", params, ("doc_idx", "sample_idx", "shuffle_idx"), build)
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]
        self.num_epochs = num_epochs
        self.tokens_per_epoch = tokens_per_epoch

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        j = int(self.shuffle_idx[idx])
        first_pos, first_offset = (int(v) for v in self.sample_idx[j])
        last_pos, last_offset = (int(v) for v in self.sample_idx[j + 1])  # last token inclusive
        if first_pos == last_pos:
            doc = int(self.doc_idx[first_pos])
            tokens = self.indexed.get(doc, first_offset, last_offset - first_offset + 1)
        else:
            parts = [self.indexed.get(int(self.doc_idx[first_pos]), first_offset)]
            parts += [self.indexed.get(int(self.doc_idx[p])) for p in range(first_pos + 1, last_pos)]
            parts.append(self.indexed.get(int(self.doc_idx[last_pos]), 0, last_offset + 1))
            tokens = np.concatenate(parts)
        return {"text": tokens.astype(np.int64)}
