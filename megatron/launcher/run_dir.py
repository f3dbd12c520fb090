"""The run directory: where the resolved config, the original YAML and the metrics of one run are kept.

    <run_dir>/neox_args.json         the resolved config (NeoXArgs.to_dict(): every key + derived values);
                                     the workers read it (`--neox_args_file`)
    <run_dir>/config.yml             the same, as YAML
    <run_dir>/original_configs.yml   the YAML files as the user wrote them, each under `# --- file: <path>`
    <run_dir>/metrics.jsonl          written by the logger during training
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Mapping, Optional, Sequence

import yaml

RESOLVED_JSON = "neox_args.json"
RESOLVED_YAML = "config.yml"
ORIGINAL_YAML = "original_configs.yml"
DEFAULT_RUNS_ROOT = "runs"


def resolve_run_dir(log_dir: Optional[str], environ: Mapping[str, str] = os.environ,
                    now: Optional[datetime.datetime] = None) -> str:
    """Absolute run directory: `log_dir` when set, else `runs/<UTC timestamp>` under the working directory.

    Under Slurm (SLURM_JOB_ID set) the default is `runs/slurm-<job id>`, the same on every task, because
    with `deepspeed_slurm` every task resolves the directory on its own.
    """
    if log_dir:
        return os.path.abspath(log_dir)
    job_id = environ.get("SLURM_JOB_ID")
    if job_id:
        return os.path.abspath(os.path.join(DEFAULT_RUNS_ROOT, f"slurm-{job_id}"))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    base = os.path.abspath(os.path.join(DEFAULT_RUNS_ROOT, now.strftime("%Y%m%d-%H%M%S")))
    candidate, suffix = base, 1
    while os.path.exists(candidate):  # two launches in the same second get different directories
        candidate, suffix = f"{base}-{suffix}", suffix + 1
    return candidate


def resolved_config_dict(args) -> dict:
    """`args.to_dict()` with JSON types only (tuples become lists), ready for json and yaml.safe_dump."""
    return json.loads(json.dumps(args.to_dict()))


def concatenate_original_configs(paths: Sequence[str]) -> str:
    """The user's YAML files, verbatim, each preceded by a `# --- file: <path>` line."""
    chunks = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.endswith("\n"):
            text += "\n"
        chunks.append(f"# --- file: {path}\n{text}")
    return "".join(chunks)


def resolved_json_path(run_dir: str) -> str:
    return os.path.join(run_dir, RESOLVED_JSON)


def write_resolved_json(run_dir: str, args) -> str:
    """Write `<run_dir>/neox_args.json` atomically (a temp file renamed: the workers read it, and under
    deepspeed_slurm every task writes the same content); returns its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = resolved_json_path(run_dir)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(resolved_config_dict(args), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def save_run_files(run_dir: str, args, config_paths: Sequence[str]) -> None:
    """Write neox_args.json, config.yml and original_configs.yml into `run_dir` (created if missing)."""
    write_resolved_json(run_dir, args)
    with open(os.path.join(run_dir, RESOLVED_YAML), "w", encoding="utf-8") as f:
        f.write(resolved_config_yaml(args))
    with open(os.path.join(run_dir, ORIGINAL_YAML), "w", encoding="utf-8") as f:
        f.write(concatenate_original_configs(config_paths))


def resolved_config_yaml(args) -> str:
    """The resolved config as YAML (user keys in field order, then the `derived` block)."""
    return yaml.safe_dump(resolved_config_dict(args), sort_keys=False, default_flow_style=False)
