"""The on-disk layout of a checkpoint directory, and reading it without DeepSpeed.

    <save>/latest                              text: the tag of the newest COMPLETE checkpoint
    <save>/global_step<N>.partial/             a save in progress; renamed to global_step<N> when complete
    <save>/global_step<N>/                     one tag per save
        mp_rank_<tp:02d>_model_states.pt       DeepSpeed: {"module": state_dict, "client_state"..., ...}
                                               (ZeRO-3: zero_pp_rank_<dp>_mp_rank_<tp:02d>_model_states.pt,
                                               weights only in the partitions; see read_model_state)
        *_optim_states.pt                      DeepSpeed: optimizer (ZeRO partitions, or the whole one)
        rng_state_rank<r>.pt                   ours: every rank's RNG states
        neox_args.json                         ours: the resolved config of the run
        complete                               ours: written last, after every rank finished

`latest` is replaced atomically (write a temp file, then rename) only after `complete` exists, so an
interrupted save leaves the previous checkpoint as the one that resumes.
"""

from __future__ import annotations

import glob
import os
import re

import torch

TAG_PATTERN = re.compile(r"^global_step(\d+)$")
COMPLETE_MARKER = "complete"
CONFIG_FILE = "neox_args.json"
PARTIAL_SUFFIX = ".partial"  # a save in progress (or interrupted): never loaded
REPLACED_SUFFIX = ".replaced"  # a complete checkpoint of the same step, moved aside while its successor lands


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def tag_for_iteration(iteration: int) -> str:
    return f"global_step{iteration}"


def model_states_path(load_dir: str, tag: str, tp_rank: int = 0) -> str:
    return os.path.join(load_dir, tag, f"mp_rank_{tp_rank:02d}_model_states.pt")


def rng_state_path(load_dir: str, tag: str, rank: int) -> str:
    return os.path.join(load_dir, tag, f"rng_state_rank{rank}.pt")


def is_complete(load_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(load_dir, tag, COMPLETE_MARKER))


def complete_tags(save_dir: str) -> list[str]:
    """Tags of complete checkpoints in `save_dir`, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = TAG_PATTERN.match(name)
        if match and is_complete(save_dir, name):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found)]


def write_latest(save_dir: str, tag: str) -> None:
    """Point `latest` at `tag` atomically."""
    tmp = os.path.join(save_dir, f".latest.tmp.{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(save_dir, "latest"))


def read_latest_tag(load_dir: str) -> str:
    """The tag `latest` names, checked to be a complete checkpoint."""
    latest = os.path.join(load_dir, "latest")
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"load: directory {load_dir!r} does not exist. Set `load` to a directory "
                              f"written by `save`, or remove `load` to start from scratch.")
    if not os.path.isfile(latest):
        raise CheckpointError(f"load: {load_dir!r} has no `latest` file, so it holds no complete "
                              f"checkpoint. Point `load` at a directory written by `save`.")
    with open(latest) as handle:
        tag = handle.read().strip()
    if not os.path.isdir(os.path.join(load_dir, tag)) and is_complete(load_dir, tag + REPLACED_SUFFIX):
        return tag + REPLACED_SUFFIX  # a crash between the two renames of a save: the old copy is whole
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"load: {latest} names checkpoint {tag!r}, but {os.path.join(load_dir, tag)} "
                              f"is missing. Write the tag of an existing checkpoint into {latest}.")
    if not is_complete(load_dir, tag):
        raise CheckpointError(f"load: checkpoint {os.path.join(load_dir, tag)} is incomplete (no "
                              f"`{COMPLETE_MARKER}` marker). Write an older complete tag into {latest}.")
    return tag


def resolve_tag(load_dir: str, tag: str | None = None) -> str:
    """`tag` if it names a complete checkpoint in `load_dir`, or the `latest` one when `tag` is None;
    CheckpointError naming the complete tags otherwise."""
    if tag is None:
        return read_latest_tag(load_dir)
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{os.path.join(load_dir, tag)} does not exist; complete checkpoints in "
                              f"{load_dir!r}: {complete_tags(load_dir) or 'none'}.")
    if not is_complete(load_dir, tag):
        raise CheckpointError(f"{os.path.join(load_dir, tag)} is incomplete (no `{COMPLETE_MARKER}` marker): "
                              f"its save was interrupted. Use a complete tag: {complete_tags(load_dir) or 'none'}.")
    return tag


def torch_load(path: str, what: str):
    """torch.load with an error that names the file instead of a deep stack trace."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing ({what}). The checkpoint is damaged: "
                              f"resume from an older tag by writing it into `latest`.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors of a truncated or corrupted file
        raise CheckpointError(f"checkpoint file {path} cannot be read ({what}): {exc.__class__.__name__}: "
                              f"{exc}. The file is corrupted: resume from an older tag by writing it into "
                              f"`latest`.") from None


def zero3_model_states_paths(load_dir: str, tag: str, tp_rank: int = 0) -> list[str]:
    """The per-data-parallel-rank model files DeepSpeed writes under ZeRO stage 3 instead of
    `mp_rank_XX_model_states.pt` (their `module` tensors are empty: the weights live in the partitions)."""
    name = f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt"
    return sorted(glob.glob(os.path.join(glob.escape(os.path.join(load_dir, tag)), name)))


def zero3_consolidation_message(load_dir: str, tag: str, tp_rank: int = 0) -> str:
    """How to turn a ZeRO-3 checkpoint into the full weights that `read_model_state` reads.

    The commands are run verbatim by tests/e2e/test_zero_e2e.py (with `<out_dir>` replaced)."""
    out = "<out_dir>"
    target = model_states_path(load_dir, tag, tp_rank)
    script = os.path.join(load_dir, "zero_to_fp32.py")
    return (f"{os.path.join(load_dir, tag)} is a ZeRO stage 3 checkpoint: its weights are partitioned over the "
            f"data-parallel ranks (the zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt files hold empty "
            f"tensors), so there is no {os.path.basename(target)} with the full model. Consolidate the "
            f"partitions with the script DeepSpeed saved beside the checkpoint (model_parallel_size 1 only: "
            f"it does not separate tensor-parallel ranks): `python {script} {load_dir} {out} --tag {tag} "
            f"--max_shard_size 100000GB` writes the fp32 weights to {out}/pytorch_model.bin with this "
            f"trainer's keys; then `python -c \"import torch; torch.save({{'module': "
            f"torch.load('{out}/pytorch_model.bin')}}, '{target}')\"` makes the checkpoint readable here and "
            f"by tools/ckpts/convert_neox_to_hf.py.")


def read_model_state(load_dir: str, tag: str | None = None, tp_rank: int = 0):
    """Read `(model state_dict, NeoXArgs)` of one tensor-parallel rank without DeepSpeed."""
    from megatron.neox_args import NeoXArgs

    tag = tag or read_latest_tag(load_dir)
    path = model_states_path(load_dir, tag, tp_rank)
    if not os.path.isfile(path) and zero3_model_states_paths(load_dir, tag, tp_rank):
        raise CheckpointError(zero3_consolidation_message(load_dir, tag, tp_rank))
    states = torch_load(path, "model weights")
    config_path = os.path.join(load_dir, tag, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path} is missing: this checkpoint does not carry its config.")
    with open(config_path) as handle:
        args = NeoXArgs.from_serialized(handle.read())
    return states["module"], args
