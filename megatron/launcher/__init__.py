"""Launching a run: deepy.py's steps (`main`) and the worker side (`parse_worker_args`).

- `cli.py`: parse, resolve the config once, save the run files, launch; exit status handling.
- `command.py`: the DeepSpeed runner command for the launcher section (single node, CPU, hostfile, MPI).
- `slurm.py`: `deepspeed_slurm: true`, each srun task becomes one rank directly.
- `run_dir.py`: the run directory and the config files saved in it.
- `worker_args.py`: `--neox_args <base64>`, encoded by deepy.py, decoded by train.py.
"""

from megatron.launcher.cli import main
from megatron.launcher.command import LaunchError, LaunchPlan, plan_launch, runner_command
from megatron.launcher.worker_args import decode_neox_args, encode_neox_args, parse_worker_args

__all__ = [
    "main", "parse_worker_args", "encode_neox_args", "decode_neox_args",
    "plan_launch", "runner_command", "LaunchPlan", "LaunchError",
]
