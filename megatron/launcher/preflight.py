"""Checks deepy.py runs before any worker starts, so that a mistake costs seconds, not a launch.

- `check_deepspeed_config(args)`: the DeepSpeed blocks (zero_optimization, bf16, fp16, data_types, ...)
  through DeepSpeed's own config class (`deepspeed.runtime.config.DeepSpeedConfig`), its pydantic errors
  turned into ConfigErrors naming the file, the key and the closest valid key. The dry run calls it too.
- `check_precision_device(args, cuda_available)`: fp16 needs a GPU (DeepSpeed's CPU accelerator has no
  fp16); bf16 and fp32 run anywhere.
- `check_paths(args)`: `save`, `load`, `log_dir`, `tensorboard_dir` must be directories or creatable ones
  (not files, not under a file); a `load` other than `save` must hold a checkpoint; the save directory must
  not be held by a running run (`checkpointing.lock`) nor, for a fresh run, hold checkpoints
  (`checkpointing.save_dir`).
- `choose_master_port(args, environ)`: on a single node a busy default port is replaced by a free one; a
  port the user set is kept, and an error if it is busy.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import sys
from typing import Mapping

from megatron.neox_args import ConfigError

DEEPSPEED_BLOCKS = ("zero_optimization", "bf16", "fp16", "data_types")
DEFAULT_MASTER_PORT = 29500


def _source(args, key: str) -> str:
    try:
        return args.source_of(key)
    except Exception:  # noqa: BLE001 - a config built without sources
        return "default"


def _model_class(title: str):
    """The DeepSpeed pydantic model class named `title` (the title of its ValidationError)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    stack = [DeepSpeedConfigModel]
    while stack:
        cls = stack.pop()
        if cls.__name__ == title:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def _valid_keys(model_cls, path: tuple) -> list[str]:
    """Field names (and aliases) of `model_cls` after following `path` through nested model fields."""
    import typing

    cls = model_cls
    for name in path:
        field = getattr(cls, "model_fields", {}).get(name)
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        cls = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)
        if cls is None:
            return []
    keys = []
    for name, field in getattr(cls, "model_fields", {}).items():
        keys.append(name)
        if field.alias:
            keys.append(field.alias)
    return sorted(set(keys))


def _block_of(config: dict, loc: tuple) -> str | None:
    """The top-level DeepSpeed block whose dict contains the error location `loc`."""
    for block in DEEPSPEED_BLOCKS:
        node = config.get(block)
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and loc and loc[-1] in node:
            return block
    return None


def deepspeed_error(args, config: dict, error) -> ConfigError:
    """A ConfigError for DeepSpeed's pydantic ValidationError `error` on `config`."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    block = _block_of(config, loc) or "the DeepSpeed config"
    key = ".".join((block,) + loc) if block in DEEPSPEED_BLOCKS else ".".join(loc)
    where = _source(args, block) if block in DEEPSPEED_BLOCKS else "default"
    if first["type"] == "extra_forbidden":
        model_cls = _model_class(getattr(error, "title", ""))
        valid = _valid_keys(model_cls, loc[:-1]) if model_cls is not None else []
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(valid)}." if valid else ""
        return ConfigError(f"{key}: DeepSpeed does not know the key `{loc[-1]}` ({where}); {hint} Fix or remove "
                           f"it (DeepSpeed's {getattr(error, 'title', 'config')} rejects it when the workers start).",
                           key=block, sources=(where,))
    return ConfigError(f"{key}: {first.get('input')!r} is rejected by DeepSpeed ({where}): {first['msg']}. Fix "
                       f"the value.", key=block, sources=(where,))


def check_deepspeed_config(args) -> None:
    """Build DeepSpeed's own config object from `args.deepspeed_config()`; ConfigError on what it rejects.

    The global batch is left out (DeepSpeed checks it against the world size, which is only known when
    the workers run; our own validation checked it already)."""
    from pydantic import ValidationError

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger binds to stdout at import; keep it clean
        from deepspeed.runtime.config import DeepSpeedConfig

    config = args.deepspeed_config()
    probe = {key: value for key, value in config.items() if key != "train_batch_size"}
    try:
        DeepSpeedConfig(probe)
    except ValidationError as err:
        raise deepspeed_error(args, config, err) from None
    except (ValueError, AssertionError, KeyError, TypeError) as err:
        raise ConfigError(f"DeepSpeed rejects the config built from {', '.join(DEEPSPEED_BLOCKS)}: {err}. Fix those "
                          f"blocks.") from None


def cuda_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def check_precision_device(args, cuda_available: bool, bf16_supported=cuda_bf16_supported) -> None:
    """fp16 needs a GPU; bf16 on a GPU needs one with bf16 (Ampere or later); on a CPU bf16 is emulated."""
    if args.derived.precision == "bf16" and cuda_available and not bf16_supported():
        where = _source(args, "bf16")
        raise ConfigError(f"bf16: {{enabled: true}} ({where}), but this GPU has no bf16 support (it needs an Ampere "
                          f"or later GPU). Use fp16: {{enabled: true}} instead.", key="bf16", sources=(where,))
    if args.derived.precision == "fp16" and not cuda_available:
        where = _source(args, "fp16")
        raise ConfigError(f"fp16: {{enabled: true}} needs a GPU ({where}), and this machine has none (DeepSpeed's "
                          f"CPU accelerator has no fp16). Use bf16: {{enabled: true}} or fp32 on a CPU.",
                          key="fp16", sources=(where,))


def _check_dir_path(args, key: str, path: str | None) -> None:
    """`path` is a directory, or can be created (no file at it or above it)."""
    if not path:
        return
    where = _source(args, key)
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise ConfigError(f"{key}: {path!r} is a file, not a directory ({where}); point {key} at a directory "
                          f"(it is created if missing).", key=key, sources=(where,))
    parent = probe
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{key}: {path!r} cannot be created: {parent} is a file ({where}); choose a path "
                          f"under a directory.", key=key, sources=(where,))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{key}: {path!r} is not writable ({parent} does not allow writing) ({where}); choose "
                          f"a writable directory.", key=key, sources=(where,))


def check_paths(args) -> None:
    from megatron.checkpointing.layout import CheckpointError
    from megatron.checkpointing.lock import check_not_busy
    from megatron.checkpointing.resume import has_checkpoint, no_checkpoint_message, same_directory
    from megatron.checkpointing.save_dir import conflict, latest_step

    checkpoint, logging = args.checkpoint, args.logging
    for key, path in (("save", checkpoint.save), ("log_dir", logging.log_dir),
                      ("tensorboard_dir", logging.tensorboard_dir)):
        _check_dir_path(args, key, path)
    load = checkpoint.load
    if load:
        where = _source(args, "load")
        if os.path.exists(load) and not os.path.isdir(load):
            raise ConfigError(f"load: {load!r} is a file, not a checkpoint directory ({where}).", key="load",
                              sources=(where,))
        if not has_checkpoint(load) and (checkpoint.finetune or not same_directory(load, checkpoint.save)):
            raise ConfigError(f"{no_checkpoint_message(load, checkpoint.save)} ({where})", key="load",
                              sources=(where,))
    if checkpoint.save and os.path.isdir(checkpoint.save):
        try:
            check_not_busy(checkpoint.save)
        except CheckpointError as err:
            raise ConfigError(str(err), key="save", sources=(_source(args, "save"),)) from None
        start = 0 if not load or checkpoint.finetune else (latest_step(load) or 0)
        problem = conflict(checkpoint.save, load, start, checkpoint.finetune)
        if problem and not checkpoint.overwrite_checkpoints:
            raise ConfigError(f"{problem} ({_source(args, 'save')})", key="save", sources=(_source(args, "save"),))


def port_is_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def single_node(launcher) -> bool:
    return not launcher.hostfile and launcher.num_nodes <= 1 and not launcher.deepspeed_slurm and \
        launcher.master_addr in (None, "", "localhost", "127.0.0.1")


def choose_master_port(args, environ: Mapping[str, str] = os.environ) -> str | None:
    """Make `launcher.master_port` usable on a single node; returns a note to print when it was changed."""
    launcher = args.launcher
    if not single_node(launcher) or port_is_free(launcher.master_port):
        return None
    where = _source(args, "master_port")
    if where != "default" or launcher.master_port != DEFAULT_MASTER_PORT:
        raise ConfigError(f"master_port: {launcher.master_port} is in use on this machine ({where}), probably by "
                          f"another run; stop it, choose another port, or remove master_port to let deepy.py pick "
                          f"a free one.", key="master_port", sources=(where,))
    port = free_port()
    launcher.master_port = port
    return f"deepy.py: the default master_port {DEFAULT_MASTER_PORT} is in use; using the free port {port}"


def preflight(args, cuda_available: bool, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every check above, in order; returns the notes to print. Raises ConfigError."""
    if not cuda_available:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what the workers get (command.accelerator_env)
    check_deepspeed_config(args)
    check_precision_device(args, cuda_available)
    check_paths(args)
    note = choose_master_port(args, environ)
    return [note] if note else []
