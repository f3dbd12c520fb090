"""Starting torch.distributed through DeepSpeed, and the CPU shared-memory segments it leaves behind."""

from __future__ import annotations

import os

import torch


def init_distributed() -> str:
    """Start torch.distributed through DeepSpeed from the launcher's environment; returns the device type
    ("cuda": nccl, the local GPU selected; "cpu": gloo, with the shm segment names released)."""
    import deepspeed

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    if not use_cuda:
        release_cpu_shm_names()
    return "cuda" if use_cuda else "cpu"


def cpu_shm_segment_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce op creates for `rank` (name set in its shm.cpp)."""
    return "/dev/shm/deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)


def release_cpu_shm_names() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    On CPU, when all ranks share a node, DeepSpeed maps a 66 MB /dev/shm segment per rank (named by
    address, port and rank) and never unlinks it: each run leaks 66 MB x ranks of RAM-backed tmpfs until
    the machine runs out (a test suite of ~100 launches filled 23 GB). Every rank maps all peers'
    segments inside `init_distributed`, so after a barrier the names can go; the mappings stay valid
    and the memory is freed when the last process exits, even on a crash.
    """
    import torch.distributed as dist

    dist.barrier()
    try:
        os.unlink(cpu_shm_segment_path(dist.get_rank()))
    except FileNotFoundError:  # no shm op (ranks on several nodes, or the op is not built)
        pass
