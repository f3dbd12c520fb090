"""build_train_valid_test_data_iterators: batches, data-parallel slicing, resume, cycling, splits, blending."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron.data import build_train_valid_test_data_iterators, num_samples_needed, parse_split
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.neox_args.sections import DataArgs, DerivedArgs, TrainingArgs

SEQ = 16


def write_dataset(prefix, n_docs, low, high, seed=0):
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in rng.integers(5, 60, size=n_docs):
        builder.add_item(rng.integers(low, high, size=n))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("it") / "corpus"), 200, 0, 1000)


def setup(micro, grad_acc, dp, train_iters=8, **data_kwargs):
    training = TrainingArgs(train_iters=train_iters, eval_interval=4, eval_iters=2, seed=99)
    derived = DerivedArgs(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=grad_acc,
                          data_parallel_size=dp, train_batch_size=micro * grad_acc * dp)
    data = DataArgs(num_workers=0, **data_kwargs)
    return data, training, derived


def iterators(data, training, derived, dp_rank=0, dp_size=1, **kwargs):
    parallel = SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size)
    return build_train_valid_test_data_iterators(data, training, derived, SEQ, parallel, **kwargs)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_layout(data_prefix):
    train, valid, test = iterators(*setup(3, 1, 1, data_path=data_prefix, split="90,5,5"))
    batch = next(train)
    assert set(batch) == {"tokens", "labels", "loss_mask"}
    assert batch["tokens"].shape == (3, SEQ) and batch["tokens"].dtype == torch.long
    assert batch["labels"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    torch.testing.assert_close(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.all(batch["loss_mask"] == 1)
    assert int(batch["tokens"].max()) < 1000
    assert next(valid)["tokens"].shape == (3, SEQ) and next(test)["tokens"].shape == (3, SEQ)


def test_one_rank_with_accumulation_sees_what_two_ranks_see(data_prefix):
    one_rank, _, _ = iterators(*setup(2, 2, 1, data_path=data_prefix))
    rank0, _, _ = iterators(*setup(2, 1, 2, data_path=data_prefix), dp_rank=0, dp_size=2)
    rank1, _, _ = iterators(*setup(2, 1, 2, data_path=data_prefix), dp_rank=1, dp_size=2)
    for _ in range(4):  # optimizer steps
        step_one = torch.cat([next(one_rank)["tokens"], next(one_rank)["tokens"]])
        step_two = torch.cat([next(rank0)["tokens"], next(rank1)["tokens"]])
        torch.testing.assert_close(step_one, step_two, rtol=0, atol=0)


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_resume_continues_the_uninterrupted_stream(data_prefix, dp_rank):
    args = setup(2, 1, 2, data_path=data_prefix)
    full, valid, _ = iterators(*args, dp_rank=dp_rank, dp_size=2)
    batches = take(full, 7)
    consumed = 3 * args[2].train_batch_size  # after 3 optimizer steps
    resumed, _, _ = iterators(*args, dp_rank=dp_rank, dp_size=2, consumed_train_samples=consumed)
    for expected, got in zip(batches[3:], take(resumed, 4)):
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_workers_give_the_same_batches(data_prefix):
    data, training, derived = setup(2, 1, 1, data_path=data_prefix)
    in_process = take(iterators(data, training, derived)[0], 5)
    data.num_workers = 2
    with_workers = take(iterators(data, training, derived)[0], 5)
    for a, b in zip(in_process, with_workers):
        torch.testing.assert_close(a["tokens"], b["tokens"], rtol=0, atol=0)


def test_valid_iterator_cycles(data_prefix):
    data, training, derived = setup(2, 1, 1, data_path=data_prefix)
    _, valid, _ = iterators(data, training, derived)
    n_valid = num_samples_needed(training, derived)[1]
    assert n_valid == (8 // 4 + 1) * 2 * 2
    first = next(valid)
    for _ in range(500):  # far beyond the valid samples: restarts instead of raising
        last = next(valid)
    assert last["tokens"].shape == first["tokens"].shape
    _, valid_again, _ = iterators(data, training, derived)
    n_batches = len(valid_again._iter)
    later = take(valid_again, n_batches + 1)
    torch.testing.assert_close(later[-1]["tokens"], first["tokens"], rtol=0, atol=0)  # wrapped to the start


def test_empty_splits_give_none(data_prefix):
    train, valid, test = iterators(*setup(2, 1, 1, data_path=data_prefix, split="100,0,0"))
    assert train is not None and valid is None and test is None
    train, valid, test = iterators(*setup(2, 1, 1, data_path=data_prefix, split="99,1"))
    assert valid is not None and test is None


def test_blended_train_paths(tmp_path, data_prefix):
    high = write_dataset(str(tmp_path / "high"), 50, 30000, 31000, seed=1)
    data, training, derived = setup(4, 1, 1, train_iters=50, train_data_paths=[data_prefix, high],
                                    train_data_weights=[0.5, 0.5], valid_data_paths=[high])
    train, valid, test = iterators(data, training, derived)
    assert test is None
    tokens = torch.cat([b["tokens"] for b in take(train, 50)])  # 200 samples
    from_high = (tokens >= 30000).all(dim=1)
    from_low = (tokens < 1000).all(dim=1)
    assert bool(torch.all(from_high | from_low))  # a sample never mixes datasets
    assert int(from_high.sum()) == 100
    assert bool((next(valid)["tokens"] >= 30000).all())


def test_parse_split():
    assert parse_split("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert parse_split("98,2", 10) == [(0, 10), (10, 10), (10, 10)]
    assert parse_split("1,1,1", 10) == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(ValueError, match="969,30,1"):
        parse_split("a,b", 10)


def test_document_fields_come_with_every_micro_batch(tmp_path):
    """Documents ending with the end-of-document id (as preprocessing --append-eod writes them): each batch
    carries loss_mask, position_ids, cu_seqlens and max_seqlen built from its own tokens."""
    from megatron.data.doc_masks import DocumentMasking, document_fields

    eod = 999
    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "eod_corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in rng.integers(3, 12, size=100):
        builder.add_item(np.append(rng.integers(1, 900, size=n), eod))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    masking = DocumentMasking(eod, reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
    train, _, _ = iterators(*setup(2, 1, 1, data_path=prefix, split="1,0,0"), masking=masking)
    docs_seen = 0
    for batch in take(train, 4):
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "max_seqlen"}
        expected = document_fields(batch["tokens"], masking)
        assert torch.equal(batch["cu_seqlens"], expected["cu_seqlens"]) and batch["max_seqlen"] == expected["max_seqlen"]
        assert torch.equal(batch["position_ids"], expected["position_ids"])
        assert torch.equal(batch["loss_mask"], (batch["tokens"] != eod).float())
        docs_seen += len(batch["cu_seqlens"]) - 1
    assert docs_seen > 4 * 2  # more documents than rows: boundaries inside samples
