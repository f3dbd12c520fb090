"""What a run may do with the checkpoints already in its `save` directory.

- A fresh run (no `load`) into a directory holding checkpoints is refused: repeating a command must never
  replace a longer run's checkpoints. With `overwrite_checkpoints: true` they are deleted at the start.
- A run resumed from another directory (`load` != `save`) at iteration i into a `save` whose `latest` is
  a later step is refused the same way: its saves would move `latest` back.
- `latest` never moves back: `check_latest_moves_forward` guards every save.
"""

from __future__ import annotations

import os
import shutil

from megatron.checkpointing.layout import PARTIAL_SUFFIX, REPLACED_SUFFIX, TAG_PATTERN, CheckpointError, complete_tags


def _step(tag: str) -> int:
    return int(TAG_PATTERN.match(tag).group(1))


def latest_step(save_dir: str) -> int | None:
    """The step `<save>/latest` names, or None without a readable `latest`."""
    path = os.path.join(save_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        match = TAG_PATTERN.match(handle.read().strip().removesuffix(REPLACED_SUFFIX))
    return int(match.group(1)) if match else None


def _same_dir(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def conflict(save: str | None, load: str | None, start_iteration: int = 0, finetune: bool = False) -> str | None:
    """Why this run must not save into `save` without `overwrite_checkpoints` (a message), or None."""
    if not save or not os.path.isdir(save):
        return None
    tags = complete_tags(save)
    newest = max([_step(tag) for tag in tags] + [latest_step(save) or 0]) if tags or latest_step(save) else None
    if newest is None:
        return None
    if not load:
        return (f"save: {save} already holds checkpoints (newest: global_step{newest}) and this run does not "
                f"resume (no `load`), so its saves would replace them. Set `load: {save}` to resume that run, "
                f"choose another `save` directory, or set overwrite_checkpoints: true to delete them and start "
                f"over.")
    if (finetune or not _same_dir(save, load)) and newest > start_iteration:
        return (f"save: {save} holds checkpoints up to global_step{newest}, but this run resumes from {load} at "
                f"step {start_iteration}, so its saves would move `latest` back. Choose another `save` "
                f"directory, or set overwrite_checkpoints: true to delete the checkpoints in {save}.")
    return None


def clear_checkpoints(save: str) -> list[str]:
    """Delete every checkpoint tag (complete, partial, replaced) and `latest` in `save`; returns the names."""
    removed = []
    for name in sorted(os.listdir(save)):
        base = name.removesuffix(PARTIAL_SUFFIX).removesuffix(REPLACED_SUFFIX)
        if TAG_PATTERN.match(base) and os.path.isdir(os.path.join(save, name)):
            shutil.rmtree(os.path.join(save, name))
            removed.append(name)
    if os.path.isfile(os.path.join(save, "latest")):
        os.remove(os.path.join(save, "latest"))
        removed.append("latest")
    return removed


def claim_save_dir(checkpoint, start_iteration: int) -> str | None:
    """Rank 0, holding the save directory's lock: apply the rules above. Returns a message to print when
    checkpoints were deleted (overwrite_checkpoints), raises CheckpointError when the run is refused."""
    problem = conflict(checkpoint.save, checkpoint.load, start_iteration, checkpoint.finetune)
    if problem is None:
        return None
    if not checkpoint.overwrite_checkpoints:
        raise CheckpointError(problem)
    removed = clear_checkpoints(checkpoint.save)
    return f"save: overwrite_checkpoints: true: deleted {', '.join(removed)} from {checkpoint.save}"


def check_latest_moves_forward(save_dir: str, tag: str) -> None:
    """Refuse a save that would point `latest` at an earlier step than it names now."""
    current = latest_step(save_dir)
    if current is not None and _step(tag) < current:
        raise CheckpointError(f"save: refusing to move {os.path.join(save_dir, 'latest')} back from "
                              f"global_step{current} to {tag}; another run saved later steps into {save_dir}. "
                              f"Set `save` to another directory.")
