"""`deepspeed_slurm: true`: srun starts deepy.py once per task; each task becomes one rank directly.

    srun --nodes 2 --ntasks-per-node 8 python deepy.py train.py configs/my.yml

No DeepSpeed runner is involved. Each task reads its place from Slurm's environment and replaces itself
with the worker (`os.execve`), setting the variables torch.distributed reads:
RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = master_addr or
the first host of the job's node list, MASTER_PORT = master_port.
"""

from __future__ import annotations

import re
from typing import Mapping

from megatron.neox_args import ConfigError

REQUIRED_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def require_slurm_env(environ: Mapping[str, str]) -> None:
    """Raise a clear error unless this process is a Slurm task (started by srun)."""
    missing = [name for name in REQUIRED_SLURM_VARS if not environ.get(name, "").isdigit()]
    if missing:
        raise ConfigError(
            f"deepspeed_slurm: true needs deepy.py to be started by srun (one task per rank), but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Run "
            f"`srun --nodes N --ntasks-per-node G python deepy.py train.py <configs>`, or set "
            f"deepspeed_slurm: false.", key="deepspeed_slurm")


def slurm_world_size(environ: Mapping[str, str]) -> int:
    """The number of ranks srun started (SLURM_NTASKS)."""
    require_slurm_env(environ)
    return int(environ["SLURM_NTASKS"])


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'r[1-2]-n[4,6]' -> 'r1-n4'."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    entry = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda match: re.split(r"[,-]", match.group(1))[0], entry)


def slurm_worker_env(launcher, environ: Mapping[str, str]) -> dict:
    """The rank variables for this Slurm task (see the module docstring)."""
    require_slurm_env(environ)
    master_addr = launcher.master_addr
    if not master_addr:
        nodelist = next((environ[name] for name in NODELIST_VARS if environ.get(name)), None)
        if nodelist is None:
            raise ConfigError("deepspeed_slurm: cannot find the first node (SLURM_JOB_NODELIST is not set); "
                              "set master_addr to the address of the first node.", key="master_addr")
        master_addr = first_host(nodelist)
    env = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(launcher.master_port),
    }
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit():
        env["LOCAL_SIZE"] = per_node
    return env
