"""Checks that a `.bin`/`.idx` pair is whole and fits the tokenizer, each naming the file and the fix.

- `check_index_layout(idx_path, file_size, n_items, n_doc_idx)`: the `.idx` holds the arrays its header
  announces (34 + 12 * n_items + 8 * n_doc_idx bytes); a truncated index is refused.
- `check_bin_size(bin_path, bin_size, sizes, pointers, itemsize)`: the `.bin` is exactly as long as the
  index says (the end of its last item, pointers[-1] + sizes[-1] * itemsize); a `.bin` missing its tail,
  or one of another preprocessing run, is refused when it is opened instead of when a sample reaches it.
- `check_token_ids(dataset, vocab_size, cache_dir)`: the largest token id of the `.bin` is below the
  tokenizer's vocabulary size. Scanning the file costs one read of it (~1 GB/s), so the maximum is computed
  once per node and cached with the index caches (`cache.cached_arrays`, keyed by the file's size and mtime).
"""

from __future__ import annotations

import os

import numpy as np


class DataFileError(ValueError):
    """A data file that cannot be used as it is; the message names it and says what to do."""


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data file that does not exist (also a FileNotFoundError)."""


def _remake(prefix_file: str) -> str:
    prefix = prefix_file.removesuffix(".bin").removesuffix(".idx")
    return (f"re-run tools/datasets/preprocess_data.py for {prefix} (a copy that stopped early, or the .bin "
            f"and .idx of two different runs)")


def check_index_layout(idx_path: str, file_size: int, header_size: int, n_items: int, n_doc_idx: int) -> None:
    expected = header_size + 12 * n_items + 8 * n_doc_idx
    if file_size < expected:
        raise DataFileError(f"{idx_path} is truncated: its header announces {n_items} items and {n_doc_idx} "
                            f"document-index entries ({expected} bytes), but the file has {file_size} bytes; "
                            f"{_remake(idx_path)}.")


def check_bin_size(bin_path: str, bin_size: int, sizes: np.ndarray, pointers: np.ndarray, itemsize: int) -> None:
    expected = int(pointers[-1]) + int(sizes[-1]) * itemsize if len(sizes) else 0
    if bin_size != expected:
        what = "is missing its tail" if bin_size < expected else "is longer than its index says"
        raise DataFileError(f"{bin_path} {what}: the .idx beside it describes {expected} bytes of tokens, the "
                            f"file has {bin_size}; {_remake(bin_path)}.")


def max_token_id(dataset, chunk_tokens: int = 64 * 2**20) -> int:
    """The largest token id in the dataset's `.bin` (-1 when empty), read in chunks."""
    total = dataset.num_tokens()
    if total == 0:
        return -1
    data = np.memmap(dataset.prefix + ".bin", mode="r", dtype=dataset.dtype)
    best = -1
    for start in range(0, len(data), chunk_tokens):
        best = max(best, int(data[start:start + chunk_tokens].max()))
    return best


def check_token_ids(dataset, vocab_size: int, cache_dir: str | None = None) -> None:
    """Refuse a dataset holding ids >= `vocab_size` (made with another tokenizer)."""
    from megatron.data.cache import cached_arrays

    bin_path = dataset.prefix + ".bin"
    stat = os.stat(bin_path)
    params = {"bin": os.path.abspath(bin_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    directory = cache_dir or os.path.dirname(os.path.abspath(bin_path))
    arrays = cached_arrays(directory, "max_token_id", params, ["max_id"],
                           lambda: {"max_id": np.array([max_token_id(dataset)], dtype=np.int64)})
    largest = int(arrays["max_id"][0])
    if largest >= vocab_size:
        raise DataFileError(f"{bin_path} holds token id {largest}, but the tokenizer's vocabulary has {vocab_size} "
                            f"ids (0-{vocab_size - 1}): the data was made with another tokenizer. Set "
                            f"tokenizer_type/vocab_file to the tokenizer used by preprocess_data.py, or preprocess "
                            f"the data again with this one.")
