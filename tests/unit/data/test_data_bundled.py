"""The bundled corpus: built from the Python installation, deterministic, safe to build concurrently."""

import multiprocessing
import os
import time
from types import SimpleNamespace

import numpy as np

from megatron.data import build_train_valid_test_data_iterators
from megatron.data.bundled import BUNDLED_NAME, DEFAULT_PREFIX, ensure_bundled_data, is_bundled_prefix
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.neox_args.sections import DataArgs, DerivedArgs, TrainingArgs


def _build_in_child(root):
    ensure_bundled_data(DEFAULT_PREFIX, root=root, show_progress=False)


def test_build_is_readable_deterministic_and_sizeable(tmp_path):
    start = time.perf_counter()
    first = ensure_bundled_data(DEFAULT_PREFIX, root=str(tmp_path / "a"), show_progress=False)
    elapsed = time.perf_counter() - start
    assert first == str(tmp_path / "a" / "data" / "bundled" / BUNDLED_NAME)
    assert elapsed < 30
    ds = MMapIndexedDataset(first)
    n_tokens = ds.num_tokens()
    assert n_tokens > 5_000_000 and len(ds) > 300
    assert ds.doc_idx.tolist() == list(range(len(ds) + 1))
    doc = ds[0]
    assert int(doc[-1]) == 256 and int(doc[:-1].max()) < 256  # bytes, then eod
    text = bytes(doc[:-1].astype(np.uint8)).decode("utf-8")
    assert len(text.split()) > 20  # prose, not noise

    # a second build elsewhere gives the same bytes; an existing corpus is not rebuilt
    second = ensure_bundled_data(DEFAULT_PREFIX, root=str(tmp_path / "b"), show_progress=False)
    for suffix in (".bin", ".idx"):
        with open(first + suffix, "rb") as a, open(second + suffix, "rb") as b:
            assert a.read() == b.read()
    mtime = os.path.getmtime(first + ".bin")
    assert ensure_bundled_data(DEFAULT_PREFIX, root=str(tmp_path / "a"), show_progress=False) == first
    assert os.path.getmtime(first + ".bin") == mtime


def test_concurrent_builders_do_not_collide(tmp_path):
    root = str(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(root,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    prefix = os.path.join(root, DEFAULT_PREFIX)
    assert MMapIndexedDataset(prefix).num_tokens() > 5_000_000
    assert [f for f in os.listdir(os.path.dirname(prefix)) if ".tmp" in f] == []


def test_data_path_builds_it_on_first_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative prefixes resolve against the working directory
    assert is_bundled_prefix(DEFAULT_PREFIX) and not is_bundled_prefix("data/enwik8_text_document")
    training = TrainingArgs(train_iters=2, eval_interval=1, eval_iters=1)
    derived = DerivedArgs(train_micro_batch_size_per_gpu=2, train_batch_size=2)
    data = DataArgs(data_path=DEFAULT_PREFIX, num_workers=0)
    train, valid, test = build_train_valid_test_data_iterators(
        data, training, derived, 64, SimpleNamespace(dp_rank=0, dp_size=1)
    )
    batch = next(train)
    assert batch["tokens"].shape == (2, 64) and int(batch["tokens"].max()) <= 256
    assert valid is not None and test is not None
    assert os.path.isfile(tmp_path / "data" / "bundled" / (BUNDLED_NAME + ".idx"))
