"""The .bin/.idx format: byte-compatibility with an independent writer of the documented GPT-NeoX layout."""

import pickle
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset, best_fitting_dtype, dtype_code

DOCS = [[5, 6, 7], [], [1], [65000, 2, 3, 4, 9]]


def reference_files(prefix, docs, code, np_dtype):
    """Write .bin/.idx by hand with struct, following GPT-NeoX's MMapIndexedDataset layout."""
    itemsize = np.dtype(np_dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for doc in docs:
            f.write(np.array(doc, dtype=np_dtype).tobytes())
    pointers, address = [], 0
    for doc in docs:
        pointers.append(address)
        address += len(doc) * itemsize
    doc_idx = list(range(len(docs) + 1))  # one item per document
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(docs)}i", *[len(d) for d in docs]))
        f.write(struct.pack(f"<{len(docs)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.mark.parametrize("code,np_dtype", [(8, np.uint16), (4, np.int32), (5, np.int64)])
def test_reader_reads_reference_and_builder_writes_same_bytes(tmp_path, code, np_dtype):
    ref = str(tmp_path / "ref")
    reference_files(ref, DOCS, code, np_dtype)
    ds = MMapIndexedDataset(ref)
    assert len(ds) == len(DOCS) and ds.dtype == np.dtype(np_dtype)
    assert ds.sizes.tolist() == [3, 0, 1, 5]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == doc
    assert ds.get(3, offset=1, length=3).tolist() == [2, 3, 4]
    assert ds.get(3, offset=2).tolist() == [3, 4, 9]
    assert ds.get(0, 0, 0).tolist() == []

    ours = str(tmp_path / "ours")
    builder = IndexedDatasetBuilder(ours + ".bin", dtype=np_dtype)
    for doc in DOCS:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(ours + ".idx")
    for suffix in (".bin", ".idx"):
        with open(ref + suffix, "rb") as a, open(ours + suffix, "rb") as b:
            assert a.read() == b.read(), suffix


def test_documents_of_several_items(tmp_path):
    prefix = str(tmp_path / "multi")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_item([1, 2])
    builder.add_item([3])
    builder.end_document()
    builder.add_item([4, 5, 6])
    builder.end_document()
    builder.finalize(prefix + ".idx")
    ds = MMapIndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert ds.pointers.tolist() == [0, 4, 6]  # byte offsets, 2 bytes per uint16
    assert ds[2].tolist() == [4, 5, 6]
    assert pickle.loads(pickle.dumps(ds))[1].tolist() == [3]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        MMapIndexedDataset(str(tmp_path / "missing"))
    (tmp_path / "bad.idx").write_bytes(b"TNTIDX\x00\x00" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="magic"):
        MMapIndexedDataset(str(tmp_path / "bad"))
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="outside uint16"):
        builder.add_item(np.array([70000]))
    with pytest.raises(ValueError):
        dtype_code(np.float32)
    assert best_fitting_dtype(50257) == np.uint16 and best_fitting_dtype(128256) == np.int32
    prefix = str(tmp_path / "ok")
    builder = IndexedDatasetBuilder(prefix + ".bin")
    builder.add_item([1, 2, 3])
    builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(IndexError):
        MMapIndexedDataset(prefix).get(0, offset=2, length=2)
