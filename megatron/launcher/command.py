"""The command that starts the ranks: DeepSpeed's runner, or the worker itself under `deepspeed_slurm`.

DeepSpeed's runner (`python -m deepspeed.launcher.runner`, what the `deepspeed` command runs) picks its
resources in this order: the hostfile's `host slots=N` lines (or, without one, `localhost` with every
visible device), then `--include`/`--exclude`, then `--num_nodes` and `--num_gpus`. One host runs locally
(`deepspeed.launcher.launch` spawns one process per slot and sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); several hosts go through `--launcher` (pdsh, openmpi, mvapich, slurm).

Rules enforced here, before anything starts, because the runner would otherwise fail late or quietly
start a different world size than the one the config was resolved for:
- include/exclude cannot be combined with num_gpus/num_nodes (the runner refuses it);
- openmpi and mvapich take every slot of the hostfile: no include/exclude, and num_gpus/num_nodes are
  only accepted when they agree with the hostfile (they are then not passed on, the runner refuses them);
- on a machine without a GPU the runner counts CPU "devices" as NUMA nodes, so the number of ranks is
  always passed explicitly (`--num_gpus N`, default 1) and `DS_ACCELERATOR=cpu` is set.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from typing import Mapping

from megatron.launcher.slurm import slurm_worker_env
from megatron.launcher.worker_args import WORKER_FILE_ARG
from megatron.neox_args import ConfigError

MPI_LAUNCHERS = ("openmpi", "mvapich")


class LaunchError(ConfigError):
    """A launcher setting that cannot work; the message says what to change."""


@dataclass
class LaunchPlan:
    """What deepy.py will run: `argv` with `env` added to the environment."""

    argv: list
    env: dict = field(default_factory=dict)
    exec_in_place: bool = False
    """True under deepspeed_slurm: deepy.py replaces itself with the worker (srun started every task)."""

    def display(self) -> str:
        """The command as a shell line, with the environment additions in front."""
        line = shlex.join(self.argv)
        prefix = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items()))
        return f"{prefix} {line}" if prefix else line


def accelerator_env(cuda_available: bool, environ: Mapping[str, str]) -> dict:
    """`DS_ACCELERATOR=cpu` when there is no GPU (unless the user chose an accelerator already)."""
    if cuda_available or "DS_ACCELERATOR" in environ:
        return {}
    return {"DS_ACCELERATOR": "cpu"}


def _check_mpi_hostfile(launcher) -> None:
    """openmpi/mvapich start one rank per hostfile slot: num_gpus/num_nodes may only restate that."""
    from megatron.neox_args.world_size import parse_hostfile

    pool = parse_hostfile(launcher.hostfile)
    if launcher.num_nodes > 0 and launcher.num_nodes != len(pool):
        raise LaunchError(f"launcher: {launcher.launcher} runs on every host of the hostfile ({len(pool)}), but "
                          f"num_nodes is {launcher.num_nodes}; remove num_nodes or edit the hostfile.",
                          key="num_nodes")
    if launcher.num_gpus is not None and any(slots != launcher.num_gpus for slots in pool.values()):
        raise LaunchError(f"launcher: {launcher.launcher} starts one rank per hostfile slot ({pool}), but "
                          f"num_gpus is {launcher.num_gpus}; remove num_gpus or make the slots match.",
                          key="num_gpus")


def runner_command(launcher, user_script: str, config_file: str, *, cuda_available: bool,
                   python: str = sys.executable) -> list:
    """argv of DeepSpeed's runner for the launcher section `launcher` (see the module docstring)."""
    argv = [python, "-u", "-m", "deepspeed.launcher.runner"]
    if launcher.hostfile:
        argv += ["--hostfile", launcher.hostfile, "--launcher", launcher.launcher]
    elif launcher.launcher != "pdsh" and launcher.num_nodes > 1:
        raise LaunchError(f"launcher: {launcher.launcher} with num_nodes {launcher.num_nodes} needs a hostfile "
                          f"listing the nodes (`host slots=N`), or set deepspeed_slurm: true and start "
                          f"deepy.py with srun.", key="hostfile")

    filtered = launcher.include or launcher.exclude
    mpi_multi_node = launcher.launcher in MPI_LAUNCHERS and launcher.hostfile
    if filtered:
        if launcher.launcher in MPI_LAUNCHERS:
            raise LaunchError(f"launcher: {launcher.launcher} cannot select hosts or slots (DeepSpeed's "
                              f"{launcher.launcher} backend refuses include/exclude); remove include/exclude "
                              f"and list only the hosts to use in the hostfile, or use launcher: pdsh.",
                              key="include" if launcher.include else "exclude")
        if launcher.num_gpus is not None or launcher.num_nodes > 0:
            raise LaunchError("include/exclude cannot be combined with num_gpus/num_nodes (DeepSpeed's runner "
                              "refuses it); choose the slots with include/exclude alone, or drop them.",
                              key="include" if launcher.include else "exclude")
        if launcher.include:
            argv += ["--include", launcher.include]
        else:
            argv += ["--exclude", launcher.exclude]
    elif mpi_multi_node:
        _check_mpi_hostfile(launcher)
    else:
        if launcher.num_nodes > 0:
            argv += ["--num_nodes", str(launcher.num_nodes)]
        num_gpus = launcher.num_gpus
        if num_gpus is None and not cuda_available and not launcher.hostfile:
            num_gpus = 1
        if num_gpus is not None:
            argv += ["--num_gpus", str(num_gpus)]

    if launcher.comment is not None:  # validated: launcher slurm; DeepSpeed's runner appends these to srun
        argv += ["--launcher_args", shlex.join(["--comment", launcher.comment])]
    argv += ["--master_port", str(launcher.master_port)]
    if launcher.master_addr:
        argv += ["--master_addr", launcher.master_addr]
    # warning: keeps the runner and the per-node launcher from logging every worker command line
    # (deepy.py prints the command once)
    argv += ["--log_level", "warning"]
    return argv + [user_script, WORKER_FILE_ARG, config_file]


def plan_launch(args, user_script: str, config_file: str, *, cuda_available: bool,
                environ: Mapping[str, str], python: str = sys.executable) -> LaunchPlan:
    """How to start `user_script` on every rank for the resolved config `args`, which the workers read
    from `config_file` (`--neox_args_file`)."""
    env = accelerator_env(cuda_available, environ)
    launcher = args.launcher
    if launcher.deepspeed_slurm:
        env.update(slurm_worker_env(launcher, environ))
        return LaunchPlan([python, "-u", user_script, WORKER_FILE_ARG, config_file], env, exec_in_place=True)
    argv = runner_command(launcher, user_script, config_file, cuda_available=cuda_available, python=python)
    return LaunchPlan(argv, env)
