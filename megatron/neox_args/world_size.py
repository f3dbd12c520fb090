"""How many ranks the DeepSpeed launcher will start, computed from the launcher section.

Mirrors deepspeed.launcher.runner's resource selection, in the same order:
1. the pool: the hostfile's `host slots=N` lines, or `{localhost: visible GPUs (1 without a GPU)}`;
2. `include` / `exclude` (`host1:0,1@host2`: hosts separated by `@`, optional `:slot,slot` lists);
3. `num_nodes` > 0 keeps the first num_nodes hosts;
4. `num_gpus` set: every kept host runs num_gpus ranks.
As in DeepSpeed, include/exclude cannot be combined with num_nodes > 0 or num_gpus, nor with each other.
world_size = the number of (host, slot) pairs left.

Without a hostfile, num_nodes > 1 is only accepted for Slurm launches (`deepspeed_slurm: true` or
`launcher: slurm`), where world_size = num_nodes * gpus per node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from megatron.neox_args.errors import ConfigError
from megatron.neox_args.sections import LauncherArgs

_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots\s*=\s*(?P<slots>\d+)\s*$")


def visible_gpu_count() -> int:
    """torch.cuda.device_count(), or 1 on a machine without a GPU (one CPU rank)."""
    import torch

    return torch.cuda.device_count() or 1


def parse_hostfile(path: str) -> dict[str, int]:
    """`host slots=N` lines -> {host: N} in file order; `#` comments and blank lines are ignored."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"hostfile: {path!r} does not exist; give the path of a file with `host slots=N` "
                          f"lines, or remove hostfile for a single-node run.", key="hostfile")
    pool: dict[str, int] = {}
    for number, raw in enumerate(file.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOSTFILE_LINE.match(line)
        if match is None:
            raise ConfigError(f"hostfile {path} line {number}: {raw.strip()!r} is not of the form "
                              f"`hostname slots=N`.", key="hostfile")
        host = match["host"]
        if host in pool:
            raise ConfigError(f"hostfile {path} lists host {host!r} twice (line {number}); list each host once.",
                              key="hostfile")
        pool[host] = int(match["slots"])
    if not pool:
        raise ConfigError(f"hostfile {path} lists no hosts; add `hostname slots=N` lines.", key="hostfile")
    return pool


def _parse_host_filter(spec: str, key: str, pool: dict[str, list[int]]) -> dict[str, Optional[list[int]]]:
    """`host1:0,1@host2` -> {host1: [0, 1], host2: None} (None: every slot); hosts must be in the pool."""
    selected: dict[str, Optional[list[int]]] = {}
    for part in spec.split("@"):
        part = part.strip()
        host, _, slot_text = part.partition(":")
        if not host:
            raise ConfigError(f"{key}: {spec!r} has an empty host entry; write `host1:0,1@host2`.", key=key)
        if host not in pool:
            raise ConfigError(f"{key}: host {host!r} is not in the resource pool {sorted(pool)}; "
                              f"fix the name or the hostfile.", key=key)
        slots = None
        if slot_text:
            try:
                slots = [int(s) for s in slot_text.split(",")]
            except ValueError:
                raise ConfigError(f"{key}: {part!r} must list slot numbers like `{host}:0,1`.", key=key) from None
            missing = [s for s in slots if s not in pool[host]]
            if missing:
                raise ConfigError(f"{key}: slots {missing} of host {host!r} do not exist (it has slots "
                                  f"{pool[host]}).", key=key)
        selected[host] = slots
    return selected


def select_resources(pool: dict[str, int], include: Optional[str], exclude: Optional[str],
                     num_nodes: int, num_gpus: Optional[int]) -> dict[str, list[int]]:
    """Apply include/exclude, then num_nodes, then num_gpus to `{host: slots}`; -> {host: [slot ids]}."""
    if include and exclude:
        raise ConfigError(f"include: {include!r} and exclude: {exclude!r} are both set; DeepSpeed accepts only "
                          f"one of them. Remove one.", key="include")
    if (include or exclude) and (num_nodes > 0 or num_gpus is not None):
        raise ConfigError(f"include/exclude ({include or exclude!r}) cannot be combined with num_nodes "
                          f"({num_nodes}) or num_gpus ({num_gpus}); the DeepSpeed launcher refuses that. "
                          f"Select hosts and slots with include/exclude only, or remove them.", key="include")
    active = {host: list(range(slots)) for host, slots in pool.items()}
    if include:
        chosen = _parse_host_filter(include, "include", active)
        active = {host: (slots if slots is not None else active[host]) for host, slots in chosen.items()}
    if exclude:
        removed = _parse_host_filter(exclude, "exclude", active)
        for host, slots in removed.items():
            active[host] = [] if slots is None else [s for s in active[host] if s not in slots]
        active = {host: slots for host, slots in active.items() if slots}
    if num_nodes > 0:
        if num_nodes > len(active):
            raise ConfigError(f"num_nodes: {num_nodes} but only {len(active)} host(s) are available "
                              f"({sorted(active)}); lower num_nodes or add hosts to the hostfile.", key="num_nodes")
        active = dict(list(active.items())[:num_nodes])
    if num_gpus is not None:
        active = {host: list(range(num_gpus)) for host in active}
    if not active:
        raise ConfigError("no hosts or slots are left after include/exclude; loosen them.", key="exclude")
    return active


def compute_world_size(launcher: LauncherArgs) -> int:
    """Number of ranks the launcher will start for this launcher section (see module docstring)."""
    if launcher.hostfile is not None:
        pool = parse_hostfile(launcher.hostfile)
    else:
        gpus = launcher.num_gpus if launcher.num_gpus is not None else visible_gpu_count()
        if launcher.num_nodes > 1:
            if launcher.deepspeed_slurm or launcher.launcher == "slurm":
                return launcher.num_nodes * gpus
            raise ConfigError(f"num_nodes: {launcher.num_nodes} needs a hostfile listing the nodes "
                              f"(`host slots=N` lines); set hostfile, or num_nodes: -1 for one node.",
                              key="num_nodes")
        pool = {"localhost": gpus}
    active = select_resources(pool, launcher.include, launcher.exclude, launcher.num_nodes, launcher.num_gpus)
    return sum(len(slots) for slots in active.values())
