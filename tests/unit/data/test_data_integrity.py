"""Damaged or mismatched data files are refused when opened, naming the file (issue 13): a `.bin` missing
its tail (today: trains until a sample reaches it, or `offset must be non-negative`), a truncated `.idx`
(today: `buffer is smaller than requested size`), token ids beyond the tokenizer's vocabulary (today: a
68-line `IndexError` from the embedding), checked once and cached."""

import os

import numpy as np
import pytest

from megatron.data import integrity
from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset, index_file_path
from megatron.data.integrity import DataFileError
from megatron.data.loaders import open_dataset

DOCS = [list(range(i, i + 50)) for i in range(0, 400, 50)]  # ids 0..399


def build(prefix: str, docs=DOCS) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return prefix


def test_bin_missing_its_tail_or_too_long(tmp_path):
    prefix = build(str(tmp_path / "d"))
    size = os.path.getsize(prefix + ".bin")
    for new_size in (size - 2, size // 3, size + 2):
        with open(prefix + ".bin", "r+b") as handle:
            handle.truncate(new_size)
        with pytest.raises(DataFileError, match=f"{prefix}.bin (is missing its tail|is longer).* {size} bytes"):
            MMapIndexedDataset(prefix)
    with open(prefix + ".bin", "r+b") as handle:
        handle.truncate(size)
    assert len(MMapIndexedDataset(prefix)) == len(DOCS)


def test_truncated_idx(tmp_path):
    prefix = build(str(tmp_path / "d"))
    idx = prefix + ".idx"
    with open(idx, "r+b") as handle:
        handle.truncate(os.path.getsize(idx) - 8)
    with pytest.raises(DataFileError, match=f"{idx} is truncated.*preprocess_data.py"):
        MMapIndexedDataset(prefix)


def test_token_ids_beyond_the_vocabulary_checked_once_and_cached(tmp_path, monkeypatch):
    prefix = build(str(tmp_path / "d"))
    open_dataset(prefix, vocab_size=400, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFileError, match=f"{prefix}.bin holds token id 399, .* has 257 ids"):
        open_dataset(prefix, vocab_size=257, cache_dir=str(tmp_path / "cache"))
    scans = []
    monkeypatch.setattr(integrity, "max_token_id", lambda ds: scans.append(ds) or 0)
    with pytest.raises(DataFileError):
        open_dataset(prefix, vocab_size=257, cache_dir=str(tmp_path / "cache"))
    assert scans == []  # the maximum came from the cache
