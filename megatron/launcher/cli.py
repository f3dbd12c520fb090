"""deepy.py's steps: parse the command line, resolve and validate the config once, save it, launch.

    python deepy.py train.py configs/a.yml configs/b.yml [--dry-run] [-d DIR]

Exit status: the launched job's (128 + N when it was killed by signal N); 2 for a configuration or
launcher error, which is printed as one message on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Mapping, Optional, Sequence

from megatron.engine.version import DeepSpeedVersionError, check_deepspeed_version
from megatron.launcher.command import LaunchPlan, plan_launch
from megatron.launcher.preflight import preflight
from megatron.launcher.reaper import start_reaper, wait_until_gone
from megatron.launcher.run_dir import (
    resolve_run_dir,
    resolved_config_yaml,
    resolved_json_path,
    save_run_files,
    write_resolved_json,
)
from megatron.launcher.slurm import slurm_world_size
from megatron.neox_args import ConfigError, NeoXArgs, format_error

CONFIG_ERROR_EXIT = 2


def parse_cli(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """deepy.py's command line."""
    parser = argparse.ArgumentParser(
        prog="deepy.py",
        description="Resolve YAML configs and launch the training script on every rank via DeepSpeed.",
    )
    parser.add_argument("user_script", help="the worker script, e.g. train.py")
    parser.add_argument("configs", nargs="+", help="YAML files, merged left to right")
    parser.add_argument("-d", "--conf_dir", default=None, help="directory prefixed to every config name")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the resolved config and the launch command; start nothing")
    return parser.parse_args(argv)


def config_paths(configs: Sequence[str], conf_dir: Optional[str]) -> list:
    """Config names, each prefixed with conf_dir when given."""
    return [os.path.join(conf_dir, name) if conf_dir else name for name in configs]


def load_config(paths: Sequence[str], environ: Mapping[str, str]) -> NeoXArgs:
    """Merge and validate the YAML files; under deepspeed_slurm the world size is srun's task count."""
    args = NeoXArgs.from_ymls(paths)
    if args.launcher.deepspeed_slurm:
        world_size = slurm_world_size(environ)
        if world_size != args.derived.world_size:
            args = NeoXArgs.from_ymls(paths, world_size=world_size)
    return args


def is_primary_launcher(args, environ: Mapping[str, str]) -> bool:
    """Whether this deepy.py process writes the run files (under deepspeed_slurm only task 0 does)."""
    return not args.launcher.deepspeed_slurm or environ.get("SLURM_PROCID") == "0"


def cuda_is_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_forwarding_signals(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run `argv` in its own process group, forward SIGINT/SIGTERM to the whole group, return its status.

    The child gets its own group so that one Ctrl-C reaches the runner, the per-node launcher and the
    workers exactly once (forwarded by us) and they shut down together; a third Ctrl-C kills the group.
    Returns only when no process of the group is left (workers saving after a SIGTERM outlive the runner);
    the reaper (reaper.py) stops the group if this process is killed outright. A run that was interrupted
    and failed returns 130 (the shell's status for Ctrl-C).
    """
    child = subprocess.Popen(list(argv), env=dict(env), start_new_session=True)
    reaper = start_reaper(child.pid)
    interrupts = []

    def forward(signum, _frame):
        interrupts.append(signum)
        sent = signal.SIGKILL if interrupts.count(signal.SIGINT) >= 3 else signum
        try:
            os.killpg(child.pid, sent)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
        wait_until_gone(child.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reaper.terminate()
        reaper.wait()
    if status < 0:
        return 128 - status
    if status != 0 and signal.SIGINT in interrupts:
        return 128 + signal.SIGINT
    return status


def execute(plan: LaunchPlan, environ: Mapping[str, str]) -> int:
    """Start the plan; in place (never returns) under deepspeed_slurm, else as a child process."""
    env = {**environ, **plan.env}
    sys.stdout.flush()
    sys.stderr.flush()
    if plan.exec_in_place:
        os.execve(plan.argv[0], plan.argv, env)
    return run_forwarding_signals(plan.argv, env)


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Parse, validate, save the run files, launch; returns the exit status (see module docstring)."""
    environ = dict(os.environ if environ is None else environ)
    cli = parse_cli(argv)
    paths = config_paths(cli.configs, cli.conf_dir)
    try:
        args = load_config(paths, environ)
        args.logging.log_dir = resolve_run_dir(args.logging.log_dir, environ)
        cuda_available = cuda_is_available()
        notes = preflight(args, cuda_available, environ)
        plan = plan_launch(args, cli.user_script, resolved_json_path(args.logging.log_dir),
                           cuda_available=cuda_available, environ=environ)
    except ConfigError as err:
        print(format_error(err), file=sys.stderr)
        return CONFIG_ERROR_EXIT

    if cli.dry_run:
        print(f"# resolved config (saved as {args.logging.log_dir}/config.yml when launched)")
        print(resolved_config_yaml(args), end="")
        from megatron.launcher.dry_run import describe

        print(describe(args), end="")
        print("# launch command")
        print(plan.display())
        return 0

    try:  # before any worker starts: megatron/engine was written against one DeepSpeed release
        check_deepspeed_version()
    except DeepSpeedVersionError as err:
        print(f"deepy.py: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    for note in notes:
        print(note, flush=True)
    if is_primary_launcher(args, environ):
        save_run_files(args.logging.log_dir, args, paths)
        print(f"deepy.py: run directory {args.logging.log_dir}", flush=True)
    else:  # under deepspeed_slurm each task's worker reads the file its own deepy.py wrote
        write_resolved_json(args.logging.log_dir, args)
    print(f"deepy.py: launching {plan.display()}", flush=True)
    return execute(plan, environ)
