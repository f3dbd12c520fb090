"""The run_distributed helper: results come back per rank, and a failing rank fails the test."""

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_distributed


def _sum_ranks_then_maybe_fail(rank, world_size, fail_rank):
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    if rank == fail_rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    return (rank, value.item())


def test_results_per_rank_and_failure_propagates():
    assert run_distributed(_sum_ranks_then_maybe_fail, 2, -1) == [(0, 1.0), (1, 1.0)]
    with pytest.raises(AssertionError) as info:
        run_distributed(_sum_ranks_then_maybe_fail, 2, 1)
    message = str(info.value)
    assert "rank 1 of 2 failed" in message
    assert "deliberate failure on rank 1" in message
    assert "Traceback" in message
