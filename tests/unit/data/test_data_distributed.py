"""Two gloo ranks: only LOCAL_RANK 0 builds the index cache, and the ranks read disjoint halves of each step."""

import os
from types import SimpleNamespace

import numpy as np
import torch

from megatron.data import build_train_valid_test_data_iterators, gpt_dataset
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.neox_args.sections import DataArgs, DerivedArgs, TrainingArgs
from tests.helpers.distributed import run_distributed


def _args(prefix, dp):
    training = TrainingArgs(train_iters=5, eval_interval=5, eval_iters=1, seed=4)
    derived = DerivedArgs(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, data_parallel_size=dp,
                          train_batch_size=2 * dp)
    return DataArgs(data_path=prefix, num_workers=0, split="80,20,0"), training, derived


def _rank_batches(rank, world_size, prefix):
    if rank != 0:  # a non-building rank must never compute the indices
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} built the index")
        gpt_dataset.build_doc_idx = refuse
    data, training, derived = _args(prefix, world_size)
    train, valid, _ = build_train_valid_test_data_iterators(
        data, training, derived, 32, SimpleNamespace(dp_rank=rank, dp_size=world_size)
    )
    return [next(train)["tokens"] for _ in range(5)], next(valid)["tokens"]


def test_two_ranks(tmp_path):
    prefix = str(tmp_path / "corpus")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in rng.integers(5, 80, size=100):
        builder.add_item(rng.integers(0, 5000, size=n))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    results = run_distributed(_rank_batches, 2, prefix)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 6  # train + valid, 3 arrays each

    data, training, derived = _args(prefix, 1)  # one rank reading the whole global batch
    data.data_cache_dir = str(tmp_path / "single")
    derived.train_micro_batch_size_per_gpu = 4
    derived.train_batch_size = 4
    train, _, _ = build_train_valid_test_data_iterators(data, training, derived, 32,
                                                        SimpleNamespace(dp_rank=0, dp_size=1))
    for step in range(5):
        expected = next(train)["tokens"]
        got = torch.cat([results[0][0][step], results[1][0][step]])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(results[0][1], results[1][1])  # valid batches are split over ranks too
