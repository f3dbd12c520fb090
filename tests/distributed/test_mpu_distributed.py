"""megatron.mpu on 2 and 4 gloo processes: TP=2 and TP=4, with and without sequence parallelism,
against single-process references (checks in mpu_checks.py; one spawn per world size)."""

import mpu_checks
from megatron import mpu
from tests.helpers.distributed import run_distributed


def _world2(rank, world_size):
    state = mpu.initialize_model_parallel(2)
    assert (state.tp_size, state.dp_size, state.tp_rank) == (2, 1, rank)
    mpu_checks.run_all_tensor_parallel_checks(state)
    return "ok"


def _world4(rank, world_size):
    mpu_checks.check_world_size_error(world_size)
    for tp, pp in ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)):
        mpu_checks.check_topology_matches_deepspeed(rank, world_size, tp, pp)
    mpu_checks.run_all_tensor_parallel_checks(mpu.initialize_model_parallel(4))
    mpu_checks.run_all_tensor_parallel_checks(mpu.initialize_model_parallel(2))  # two dp replicas
    mpu_checks.check_deepspeed_adapter_tp2(rank)
    return "ok"


def test_tensor_parallel_2_ranks():
    assert run_distributed(_world2, 2) == ["ok"] * 2


def test_tensor_parallel_4_ranks_topology_and_deepspeed_adapter():
    assert run_distributed(_world4, 4, timeout=240) == ["ok"] * 4
