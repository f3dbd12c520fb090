"""Checksums of a checkpoint's files, recorded in its `complete` marker and verified before it is loaded.

The marker is JSON:

    {"iteration": 100, "files": {"mp_rank_00_model_states.pt": {"size": 123, "sha256": "..."}, ...}}

listing every file of the tag directory (recursively, relative paths) except the marker itself. Markers
written before checksums existed hold only the iteration (`100\\n`): such tags load without verification.

`verified_tag` reads every listed file again and raises `CheckpointIntegrityError` naming the first file
whose size or SHA-256 differs, or that is missing (rank 0 verifies; the trainer shares its verdict).
Hashing runs on a few threads (hashlib releases the GIL on large buffers), at 0.6 GB/s per thread on a
SHA-NI core (measured on the 2-core CI box, 2026-12-01); at save time every rank hashes its share.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from megatron.checkpointing.layout import COMPLETE_MARKER, TAG_PATTERN, CheckpointError, complete_tags

CHUNK = 16 * 2**20
HASH_THREADS = 4


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint file does not match the checksum recorded when it was saved."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _files(tag_dir: str) -> list[str]:
    found = []
    for root, _dirs, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != COMPLETE_MARKER:
                found.append(rel)
    return sorted(found)


def _digests(tag_dir: str, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        return list(pool.map(lambda rel: file_sha256(os.path.join(tag_dir, rel)), names))


def checksums(tag_dir: str) -> dict:
    """{relative path: {"size": bytes, "sha256": hex}} of every file under `tag_dir` but the marker.

    Collective when torch.distributed is initialized (call it on every rank): the files are hashed by
    all ranks, rank r taking every world-th one, so that a save of N files costs about N / world file reads
    per rank (the tag directory must be visible to every rank, as it is for DeepSpeed's own load)."""
    from megatron.mpu.checks import from_rank0, gather_objects, rank_and_world

    names = from_rank0(_files(tag_dir))
    rank, world = rank_and_world()
    mine = names[rank::world]
    # sizes with the digests, before the gather: once rank 0 has every part it may rename the directory
    entries = {rel: {"size": os.path.getsize(os.path.join(tag_dir, rel)), "sha256": digest}
               for rel, digest in zip(mine, _digests(tag_dir, mine))}
    table = {}
    for part in gather_objects(entries):
        table.update(part)
    return {rel: table[rel] for rel in names}


def write_complete_marker(tag_dir: str, iteration: int, files: dict | None = None) -> None:
    """Write `complete` with the iteration and every file's checksum (`files`, from `checksums`, or computed
    here on one process), the last file of a save."""
    marker = {"iteration": iteration, "files": files if files is not None else _local_checksums(tag_dir)}
    path = os.path.join(tag_dir, COMPLETE_MARKER)
    with open(path, "w") as handle:
        json.dump(marker, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _local_checksums(tag_dir: str) -> dict:
    names = _files(tag_dir)
    return {rel: {"size": os.path.getsize(os.path.join(tag_dir, rel)), "sha256": digest}
            for rel, digest in zip(names, _digests(tag_dir, names))}


def read_recorded_checksums(tag_dir: str) -> dict | None:
    """The marker's file table, or None for a marker without checksums (written by older versions)."""
    with open(os.path.join(tag_dir, COMPLETE_MARKER)) as handle:
        text = handle.read()
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        marker = None
    if not isinstance(marker, dict):
        if text.strip().isdigit() or not text.strip():  # older markers: the iteration, or empty
            return None
        raise CheckpointIntegrityError(f"{os.path.join(tag_dir, COMPLETE_MARKER)} is damaged (neither the JSON "
                                       f"this trainer writes nor an iteration number).")
    return marker.get("files")


def marker_iteration(tag_dir: str) -> int | None:
    """The iteration a `complete` marker records (either format), or None when it records none."""
    with open(os.path.join(tag_dir, COMPLETE_MARKER)) as handle:
        text = handle.read().strip()
    if text.isdigit():
        return int(text)
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        return None
    return marker.get("iteration") if isinstance(marker, dict) else None


def find_damage(tag_dir: str) -> str | None:
    """What is wrong with the files of `tag_dir` (a sentence naming the file), or None when they match."""
    try:
        recorded = read_recorded_checksums(tag_dir)
    except CheckpointIntegrityError as err:
        return str(err)
    if recorded is None:
        return None
    for rel, expected in sorted(recorded.items()):
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{path} has {size} bytes, {expected['size']} when it was saved"
    names = sorted(recorded)
    for rel, digest in zip(names, _digests(tag_dir, names)):
        if digest != recorded[rel]["sha256"]:
            return f"{os.path.join(tag_dir, rel)} does not match its SHA-256 recorded at save time (its content changed)"
    return None


def _step(tag: str) -> int:
    return int(TAG_PATTERN.match(tag).group(1))


def older_good_tag(load_dir: str, tag: str) -> str | None:
    """The newest complete tag older than `tag` whose files pass their checksums."""
    base = tag.removesuffix(".replaced")
    for candidate in reversed(complete_tags(load_dir)):
        if TAG_PATTERN.match(base) and _step(candidate) >= _step(base):
            continue
        if find_damage(os.path.join(load_dir, candidate)) is None:
            return candidate
    return None


def verified_tag(load_dir: str, tag: str, fallback: bool) -> tuple[str, str | None]:
    """`(tag to load, warning or None)`: `tag` when its files match their checksums; otherwise, with
    `fallback`, the newest older good tag (and a warning saying so), else CheckpointIntegrityError naming
    the damaged file and the older good tag."""
    damage = find_damage(os.path.join(load_dir, tag))
    if damage is None:
        return tag, None
    older = older_good_tag(load_dir, tag)
    if fallback and older is not None:
        return older, (f"load: checkpoint {tag} is damaged ({damage}); resuming from the older checkpoint "
                       f"{older} instead (fallback_to_older_checkpoint: true).")
    if older is None:
        raise CheckpointIntegrityError(f"load: checkpoint {os.path.join(load_dir, tag)} is damaged: {damage}. No "
                                       f"older checkpoint in {load_dir} passes its checksums; restore the file "
                                       f"from a backup, or remove `load` to start from scratch.")
    raise CheckpointIntegrityError(f"load: checkpoint {os.path.join(load_dir, tag)} is damaged: {damage}. The "
                                   f"newest older good checkpoint is {older}: write `{older}` into "
                                   f"{os.path.join(load_dir, 'latest')}, or set fallback_to_older_checkpoint: "
                                   f"true to resume from it automatically.")
