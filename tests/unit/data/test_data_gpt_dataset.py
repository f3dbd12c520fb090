"""GPT dataset indices: sample index vs a token-by-token reference, epochs, shuffling, seeds, cache."""

import numpy as np
import pytest

from megatron.data import gpt_dataset
from megatron.data.gpt_dataset import GPTDataset, build_doc_idx, build_sample_idx, num_epochs_needed
from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset


def write_dataset(prefix, sizes, seed=0):
    """Documents of the given sizes with random ids in [0, 60000); returns the documents."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 60000, size=n) for n in sizes]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return docs


def reference_sample_idx(sizes_in_order, seq_length):
    """Megatron's sample-index walk, one document at a time (the loop our vectorized version replaces)."""
    n_samples = (int(np.sum(sizes_in_order)) - 1) // seq_length
    rows, doc_pos, offset = [(0, 0)], 0, 0
    for _ in range(n_samples):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes_in_order[doc_pos] - offset
            remaining -= doc_length
            if remaining <= 0:
                offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_pos += 1
                offset = 0
        rows.append((doc_pos, offset))
    return np.array(rows)


@pytest.mark.parametrize("seq_length", [1, 4, 7, 64])
def test_sample_idx_matches_reference_walk(seq_length):
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(1, 30, size=200)
    sizes[[5, 6, 50]] = 0  # empty documents are skipped
    ours = build_sample_idx(sizes, seq_length)
    ref = reference_sample_idx(sizes, seq_length)
    np.testing.assert_array_equal(ours, ref)


def test_doc_idx_is_a_permutation_per_epoch():
    docs = np.arange(10, 30)
    doc_idx = build_doc_idx(docs, 3, np.random.default_rng(0))
    assert doc_idx.shape == (60,)
    for epoch in doc_idx.reshape(3, 20):
        assert sorted(epoch.tolist()) == docs.tolist()
    assert not np.array_equal(doc_idx[:20], doc_idx[20:40])
    assert num_epochs_needed(100, 10, 9) == 1 and num_epochs_needed(100, 10, 10) == 2


@pytest.fixture()
def small(tmp_path):
    prefix = str(tmp_path / "small")
    sizes = np.random.default_rng(1).integers(1, 40, size=25)
    docs = write_dataset(prefix, sizes)
    return MMapIndexedDataset(prefix), docs


def test_samples_are_windows_of_the_document_stream(small, tmp_path):
    indexed, docs = small
    seq = 16
    ds = GPTDataset("train", indexed, np.arange(3, 20), 100, seq, seed=7, cache_dir=str(tmp_path / "c"))
    stream = np.concatenate([docs[d] for d in ds.doc_idx])
    assert len(ds) >= 100
    seen = set()
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        seen.add(j)
        text = ds[i]["text"]
        assert text.dtype == np.int64 and text.shape == (seq + 1,)
        np.testing.assert_array_equal(text, stream[j * seq: (j + 1) * seq + 1])
    assert seen == set(range(len(ds)))
    assert set(ds.doc_idx.tolist()) == set(range(3, 20))  # only the split's documents


def test_shuffle_keeps_epochs_in_order(small, tmp_path):
    indexed, _ = small
    ds = GPTDataset("train", indexed, np.arange(25), 400, 8, seed=3, cache_dir=str(tmp_path))
    assert ds.num_epochs > 2
    epochs = ds.sample_idx[ds.shuffle_idx, 0] // 25  # epoch of each sample's first document, in read order
    assert np.all(np.diff(epochs) >= 0)
    first_epoch = ds.shuffle_idx[epochs == 0]
    assert not np.array_equal(first_epoch, np.sort(first_epoch))  # shuffled within the epoch


def test_same_seed_same_order_other_seed_differs(small, tmp_path):
    indexed, _ = small
    a = GPTDataset("train", indexed, np.arange(25), 50, 8, seed=11, cache_dir=str(tmp_path / "a"))
    b = GPTDataset("train", indexed, np.arange(25), 50, 8, seed=11, cache_dir=str(tmp_path / "b"))
    c = GPTDataset("train", indexed, np.arange(25), 50, 8, seed=12, cache_dir=str(tmp_path / "c"))
    texts = lambda ds: np.stack([ds[i]["text"] for i in range(50)])  # noqa: E731
    np.testing.assert_array_equal(texts(a), texts(b))
    assert not np.array_equal(texts(a), texts(c))


def test_cache_is_reused(small, tmp_path, monkeypatch):
    indexed, _ = small
    cache = tmp_path / "cache"
    first = GPTDataset("valid", indexed, np.arange(25), 30, 8, seed=5, cache_dir=str(cache))
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".npy")]) == 3 and all(f.startswith("small_valid_") for f in files)

    def fail(*args, **kwargs):
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(gpt_dataset, "build_doc_idx", fail)
    again = GPTDataset("valid", indexed, np.arange(25), 30, 8, seed=5, cache_dir=str(cache))
    np.testing.assert_array_equal(first.shuffle_idx, again.shuffle_idx)
    with pytest.raises(AssertionError, match="rebuilt"):  # other parameters: a new cache entry
        GPTDataset("valid", indexed, np.arange(25), 30, 8, seed=6, cache_dir=str(cache))


def test_more_samples_keep_the_earlier_order(small, tmp_path):
    indexed, _ = small
    short = GPTDataset("train", indexed, np.arange(25), 200, 8, seed=2, cache_dir=str(tmp_path))
    long = GPTDataset("train", indexed, np.arange(25), 900, 8, seed=2, cache_dir=str(tmp_path))
    assert long.num_epochs > short.num_epochs
    n_docs_full_epochs = 25 * (short.num_epochs - 1)
    np.testing.assert_array_equal(short.doc_idx, long.doc_idx[: len(short.doc_idx)])
    full = short.sample_idx[short.shuffle_idx, 0] < n_docs_full_epochs  # samples of the complete epochs
    n_full = int(full.sum())
    np.testing.assert_array_equal(short.shuffle_idx[:n_full], long.shuffle_idx[:n_full])
