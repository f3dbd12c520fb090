"""Run a test function on N CPU processes joined in a gloo process group.

Usage (from a test file; run pytest from the repository root, `python -m pytest ...`):

    from tests.helpers.distributed import run_distributed

    def _check_tp2(rank, world_size, hidden):      # module-level: it is pickled by reference
        state = initialize_model_parallel(tp_size=2)
        ...                                         # assert freely; any exception fails the test
        return some_picklable_value                 # optional

    def test_tp2():
        results = run_distributed(_check_tp2, 2, 16)   # -> [value of rank 0, value of rank 1]

Contract:
  - `fn(rank, world_size, *args)` runs in `world_size` fresh processes (spawn), each with
    `torch.distributed` already initialized (gloo, `tcp://127.0.0.1:<free port>`), the environment
    variables RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set (DeepSpeed reads them),
    `torch.set_num_threads(1)` and `torch.manual_seed(1234)`. The process group is destroyed after.
  - If any rank raises, the others are terminated and `run_distributed` raises `AssertionError`
    carrying the failing rank and its full traceback. A run longer than `timeout` seconds (e.g. a
    rank stuck in a collective) is killed and raises `TimeoutError`.
  - Returns the list of per-rank return values (must be picklable), indexed by rank.
Spawning costs a few seconds (each process imports torch): put many checks in one `fn`.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_single_nccl_rank() -> None:
    """Make this process rank 0 of a one-rank NCCL group (the GPU tests that build a DeepSpeed engine in
    the pytest process), unless a group exists already; fails the test where there is no CUDA device."""
    import pytest
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them with -m gpu on the GPU machine)")
    if not dist.is_initialized():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(find_free_port())})
        dist.init_process_group("nccl", rank=0, world_size=1)


def _worker(rank: int, world_size: int, port: int, timeout: float, result_dir: str,
            fn: Callable, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        try:
            result = fn(rank, world_size, *args)
        except BaseException as exc:  # re-raise with the rank named; the traceback text is kept
            raise RuntimeError(f"rank {rank} of {world_size} failed in {fn.__qualname__}:\n"
                               f"{traceback.format_exc()}") from exc
        with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        # every rank done with its collectives before any tears down: rank 0 hosts the TCP store, and a
        # rank still talking to it (or to DeepSpeed's shared-memory all-reduce) when it exits can abort
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001  a peer failed: its own error is what run_distributed reports
            pass
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's normal shutdown. Two-rank DeepSpeed runs on CPU have aborted
    # there ("terminate called without an active exception", SIGABRT) after every rank had written its
    # result (2 of 3 CI runs on 2026-12-01, never locally): a C++ thread torn down at exit, not a failed check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes; see the module docstring."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as result_dir:
        port = find_free_port()
        context = mp.start_processes(_worker, args=(world_size, port, timeout, result_dir, fn, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed({fn.__qualname__}, world_size={world_size}) "
                                       f"did not finish within {timeout:.0f} s (a rank may be stuck "
                                       f"in a collective that another rank never entered)")
        except mp.ProcessRaisedException as exc:
            raise AssertionError(f"distributed test {fn.__qualname__} failed:\n{exc}") from None
        except mp.ProcessExitedException as exc:
            done = sorted(int(name[4:-4]) for name in os.listdir(result_dir) if name.startswith("rank"))
            raise AssertionError(f"distributed test {fn.__qualname__}: a rank died: {exc} (ranks that had finished "
                                 f"their checks and written a result: {done or 'none'})") from None
        finally:
            for proc in context.processes:
                if proc.is_alive():
                    proc.terminate()
                proc.join(timeout=5)
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
