"""The Megatron / GPT-NeoX memory-mapped indexed dataset: `<prefix>.bin` + `<prefix>.idx`.

Byte-compatible with GPT-NeoX's `MMapIndexedDataset` (files written by either can be read by the other).

`<prefix>.bin`: every item's tokens back to back, in the dtype of the index, no header.

`<prefix>.idx` (all integers little-endian):

    offset  size          field
    0       9             magic b"MMIDIDX\\x00\\x00"
    9       8  uint64     version = 1
    17      1  uint8      dtype code (DTYPE_CODES)
    18      8  uint64     n_items: number of items (sequences)
    26      8  uint64     n_doc_idx: length of the document index (= documents + 1)
    34      4*n_items     int32 sizes: tokens per item
    ...     8*n_items     int64 pointers: byte offset of each item in .bin
    ...     8*n_doc_idx   int64 doc_idx: item index where each document starts; starts with 0, and
                          `end_document()` appends the current item count

Preprocessing writes one item per document, so items and documents coincide in practice.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from megatron.data.integrity import DataFileError, MissingDataFileError, check_bin_size, check_index_layout

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    8: np.uint16,
}
"""The integer dtype codes of the format. (Codes 6 and 7 are floating point in the reference and are
never used for token data; reading them is refused with a clear error.)"""

_HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8


def dtype_code(dtype) -> int:
    """The format's code for an integer numpy dtype."""
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset; use one of "
                     f"{[np.dtype(d).name for d in DTYPE_CODES.values()]}.")


def best_fitting_dtype(vocab_size: int | None):
    """uint16 when every id fits below 65500 (as GPT-NeoX chooses), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class IndexedDatasetBuilder:
    """Writes a `.bin` while collecting sizes; `finalize(idx_path)` writes the `.idx`.

    Usage: `add_item(tokens)` once per item (a 1-D array or list of ids), `end_document()` after the last
    item of each document, then `finalize(index_file_path(prefix))`.
    """

    def __init__(self, bin_path: str, dtype=np.uint16):
        self._dtype = np.dtype(dtype)
        dtype_code(self._dtype)  # validate early
        self._bin = open(bin_path, "wb")
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def add_item(self, tokens) -> None:
        """Append one item. Ids outside the dtype's range are an error (no silent wrap-around)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"an item must be 1-D token ids, got shape {array.shape}")
        if array.size and array.dtype != self._dtype:
            info = np.iinfo(self._dtype)
            if int(array.min()) < info.min or int(array.max()) > info.max:
                raise ValueError(f"token ids span [{array.min()}, {array.max()}], outside {self._dtype.name}")
        self._bin.write(np.ascontiguousarray(array, dtype=self._dtype).tobytes(order="C"))
        self._sizes.append(int(array.size))

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)  # [n_items]
        pointers = np.zeros(len(sizes), dtype=np.int64)  # [n_items] byte offsets
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * self._dtype.itemsize
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)  # [n_documents + 1]
        with open(idx_path, "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", dtype_code(self._dtype)))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes(order="C"))
            f.write(pointers.astype("<i8").tobytes(order="C"))
            f.write(doc_idx.astype("<i8").tobytes(order="C"))


class MMapIndexedDataset:
    """Read-only view of `<prefix>.bin/.idx` through np.memmap (nothing is loaded into memory).

    `ds[i]` is item i (a numpy array view), `ds.get(i, offset, length)` a slice of it, `ds.sizes` the
    int32 item lengths `[n_items]`, `ds.doc_idx` the int64 document index `[n_documents + 1]`.
    Pickles by path (reopened in DataLoader workers).
    """

    def __init__(self, prefix: str):
        self._prefix = prefix
        self._open(prefix)

    def _open(self, prefix: str) -> None:
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        if not dataset_exists(prefix):
            raise MissingDataFileError(
                f"indexed dataset {prefix!r} not found: need both {idx_path} and {bin_path} "
                "(data paths are prefixes without the .bin/.idx suffix)."
            )
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < _HEADER_SIZE or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise DataFileError(f"{idx_path} is not a Megatron mmap index (magic {INDEX_MAGIC!r} expected).")
        pos = len(INDEX_MAGIC)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != INDEX_VERSION:
            raise DataFileError(f"{idx_path} has index version {version}; only version {INDEX_VERSION} is supported.")
        (code,) = struct.unpack_from("<B", header, pos + 8)
        if code not in DTYPE_CODES:
            raise DataFileError(f"{idx_path} has dtype code {code}; token datasets use one of {sorted(DTYPE_CODES)}.")
        self._dtype = np.dtype(DTYPE_CODES[code])
        n_items, n_doc_idx = struct.unpack_from("<QQ", header, pos + 9)
        check_index_layout(idx_path, os.path.getsize(idx_path), _HEADER_SIZE, n_items, n_doc_idx)

        self._index_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self._sizes = np.frombuffer(self._index_mmap, dtype="<i4", count=n_items, offset=_HEADER_SIZE)
        self._pointers = np.frombuffer(
            self._index_mmap, dtype="<i8", count=n_items, offset=_HEADER_SIZE + 4 * n_items
        )
        self._doc_idx = np.frombuffer(
            self._index_mmap, dtype="<i8", count=n_doc_idx, offset=_HEADER_SIZE + 12 * n_items
        )
        check_bin_size(bin_path, os.path.getsize(bin_path), self._sizes, self._pointers, self._dtype.itemsize)
        self._data_mmap = np.memmap(bin_path, mode="r", dtype=np.uint8) if os.path.getsize(bin_path) else None

    def __getstate__(self):
        return self._prefix

    def __setstate__(self, prefix):
        self._prefix = prefix
        self._open(prefix)

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, idx: int) -> np.ndarray:
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(f"index with an int (use get() for parts of an item), got {type(idx).__name__}")
        return self.get(int(idx))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of item `idx` (to its end when length is None)."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"item {idx} out of range for {n} items")
        size = int(self._sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside item {idx} of {size} tokens")
        if length == 0:
            return np.zeros(0, dtype=self._dtype)
        start = int(self._pointers[idx]) + offset * self._dtype.itemsize
        return np.frombuffer(self._data_mmap, dtype=self._dtype, count=length, offset=start)

    def num_tokens(self) -> int:
        return int(self._sizes.sum(dtype=np.int64))
