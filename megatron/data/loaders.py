"""From DataArgs to train/valid/test iterators of micro-batches for one data-parallel rank.

Samples needed (global, over all data-parallel ranks):
- train: train_iters * train_batch_size
- valid: (train_iters // eval_interval + 1) * eval_iters * train_batch_size
- test:  eval_iters * train_batch_size

Sources: either `data_path` (one dataset whose documents are split by `split`, e.g. "969,30,1", into
train/valid/test ranges in file order), or `train/valid/test_data_paths` (each list blended by its
weights, default equal, as GPT-NeoX). A split without documents (or without
paths) gives None in place of its iterator.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Sequence

import numpy as np
import torch

from megatron.data import bundled
from megatron.data.blending import BlendedDataset, samples_per_dataset
from megatron.data.doc_masks import DocumentMasking, document_fields
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.integrity import check_token_ids
from megatron.data.samplers import PretrainingSampler

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str, n_documents: int) -> list[tuple[int, int]]:
    """Document ranges [start, end) of train/valid/test for proportions like "969,30,1".

    Missing trailing parts are 0 ("98,2" = "98,2,0"). Boundaries are round(cumulative fraction * n),
    so the ranges are contiguous and cover all documents.
    """
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    except ValueError as err:
        raise ValueError(f"split {split!r} must be comma-separated numbers, e.g. '969,30,1'") from err
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"split {split!r} must be 1-3 non-negative numbers with a positive sum, e.g. '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    cumulative = np.cumsum(parts) / sum(parts)  # [3], last == 1
    bounds = [0] + [int(round(c * n_documents)) for c in cumulative]
    bounds[-1] = n_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def num_samples_needed(training, derived) -> tuple[int, int, int]:
    """(train, valid, test) global sample counts for the run (see the module docstring)."""
    batch = derived.train_batch_size
    train = training.train_iters * batch
    valid = (training.train_iters // training.eval_interval + 1) * training.eval_iters * batch
    test = training.eval_iters * batch
    return train, valid, test


def open_dataset(prefix: str, vocab_size: int | None = None, cache_dir: str | None = None) -> MMapIndexedDataset:
    """Open `<prefix>.bin/.idx` (whole: `integrity.py`), building the bundled corpus first if `prefix` names
    it; with `vocab_size`, its token ids are checked to be below it (once, cached)."""
    if bundled.is_bundled_prefix(prefix):
        bundled.ensure_bundled_data(prefix)
    dataset = MMapIndexedDataset(prefix)
    if vocab_size:
        check_token_ids(dataset, vocab_size, cache_dir)
    return dataset


def _blend(name: str, prefixes: Sequence[str], weights, num_samples: int, seq_length: int, seed: int,
           cache_dir: str | None, vocab_size: int | None = None):
    """One GPTDataset per prefix (all documents), blended when there are several."""
    indexed = [open_dataset(p, vocab_size, cache_dir) for p in prefixes]
    if len(indexed) == 1:
        return GPTDataset(name, indexed[0], np.arange(len(indexed[0])), num_samples, seq_length, seed, cache_dir)
    if weights is None:  # GPT-NeoX's default: equal weights, whatever the sizes
        weights = [1.0] * len(indexed)
    if len(weights) != len(indexed):
        raise ValueError(f"{name}_data_weights has {len(weights)} entries for {len(indexed)} {name}_data_paths")
    counts = samples_per_dataset(weights, num_samples)
    parts = [
        GPTDataset(name, ds, np.arange(len(ds)), max(int(c), 1), seq_length, seed, cache_dir)
        for ds, c in zip(indexed, counts)
    ]
    blend_cache = cache_dir or os.path.dirname(os.path.abspath(prefixes[0]))
    return BlendedDataset(parts, weights, num_samples, cache_dir=blend_cache, name=f"blend_{name}")


def build_train_valid_test_datasets(data, seq_length: int, seed: int, num_samples: Sequence[int],
                                    vocab_size: int | None = None):
    """(train, valid, test) datasets from DataArgs; None for a split with no documents or no samples.
    `vocab_size` (the tokenizer's): refuse data with larger token ids."""
    if data.data_path is not None:
        indexed = open_dataset(data.data_path, vocab_size, data.data_cache_dir)
        datasets = []
        for name, (start, end), n in zip(SPLIT_NAMES, parse_split(data.split, len(indexed)), num_samples):
            if end <= start or n <= 0 or indexed.sizes[start:end].sum() == 0:
                datasets.append(None)
                continue
            datasets.append(GPTDataset(name, indexed, np.arange(start, end), n, seq_length, seed, data.data_cache_dir))
        return tuple(datasets)
    paths = (data.train_data_paths, data.valid_data_paths, data.test_data_paths)
    weights = (data.train_data_weights, data.valid_data_weights, data.test_data_weights)
    if not paths[0]:
        raise ValueError("no training data: set `data_path` (split by `split`) or `train_data_paths`.")
    return tuple(
        _blend(name, p, w, n, seq_length, seed, data.data_cache_dir, vocab_size) if p and n > 0 else None
        for name, p, w, n in zip(SPLIT_NAMES, paths, weights, num_samples)
    )


def collate_samples(samples: list[dict], masking: DocumentMasking = DocumentMasking()) -> dict:
    """Samples `{"text": int64 [s + 1]}` -> tokens/labels LongTensor [b, s], loss_mask FloatTensor [b, s]
    (ones unless `masking.eod_mask_loss`), plus `position_ids` / `cu_seqlens` + `max_seqlen` when `masking`
    asks for them (megatron/data/doc_masks.py)."""
    text = torch.from_numpy(np.stack([s["text"] for s in samples]))  # [b, s + 1]
    tokens = text[:, :-1].contiguous()
    labels = text[:, 1:].contiguous()
    return {"tokens": tokens, "labels": labels, **document_fields(tokens, masking)}


def make_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                     num_workers: int, masking: DocumentMasking = DocumentMasking()) -> torch.utils.data.DataLoader:
    """DataLoader over this rank's micro-batches (PretrainingSampler), collated by `collate_samples`."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    # A private generator: each new iterator of a DataLoader draws its workers' base seed from it, and
    # drawing from the global generator would shift dropout masks after a resume (the order is fixed
    # by the sampler; the data itself uses no randomness).
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=functools.partial(collate_samples, masking=masking),
        generator=torch.Generator().manual_seed(0),
    )


class CyclingIterator:
    """Iterates a data loader built by `make_loader(consumed)`; when exhausted, starts again at sample 0.

    Used for valid/test so evaluation never runs out of batches.
    """

    def __init__(self, make_loader, consumed_samples: int):
        self._make_loader = make_loader
        self._iter = iter(make_loader(consumed_samples))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self._make_loader(0))
            return next(self._iter)  # a loader without a single batch raises StopIteration here


def build_train_valid_test_data_iterators(
    data,
    training,
    derived,
    seq_length: int,
    parallel,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    seed: int | None = None,
    masking: DocumentMasking = DocumentMasking(),
):
    """(train_iter, valid_iter, test_iter) for this data-parallel rank (`parallel.dp_rank/dp_size`).

    Each yields `{"tokens": [b, s], "labels": [b, s], "loss_mask": [b, s]}` with b the micro batch size,
    plus the document fields `masking` asks for (`position_ids`, `cu_seqlens`, `max_seqlen`).
    The train iterator starts at global sample `consumed_train_samples`; valid and test cycle forever
    (valid starts at `consumed_valid_samples`). `seed` defaults to `training.seed`. None for an empty split.
    """
    seed = training.seed if seed is None else seed
    micro = derived.train_micro_batch_size_per_gpu
    datasets = build_train_valid_test_datasets(data, seq_length, seed, num_samples_needed(training, derived),
                                               vocab_size=derived.vocab_size or None)

    def loader_for(dataset):
        return lambda consumed: make_data_loader(
            dataset, consumed % max(len(dataset), 1), micro, parallel.dp_rank, parallel.dp_size, data.num_workers,
            masking,
        )

    train, valid, test = datasets
    train_iter = None
    if train is not None:
        if consumed_train_samples > len(train):
            raise ValueError(f"consumed_train_samples={consumed_train_samples} exceeds the {len(train)} train samples")
        train_iter = iter(make_data_loader(train, consumed_train_samples, micro, parallel.dp_rank, parallel.dp_size,
                                           data.num_workers, masking))
    valid_iter = CyclingIterator(loader_for(valid), consumed_valid_samples) if valid is not None else None
    test_iter = CyclingIterator(loader_for(test), 0) if test is not None else None
    return train_iter, valid_iter, test_iter
