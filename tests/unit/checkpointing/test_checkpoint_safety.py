"""A run never loses or corrupts good checkpoints (issue 13): checksums in the `complete` marker and the
refusal of a damaged tag (with the older good tag named, or taken with fallback_to_older_checkpoint), a full
disk during a save, pruning that keeps the newest good tag, `latest` that never moves back, the save-dir
lock, and a fresh run over existing checkpoints. Stand-in engine, no DeepSpeed."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron.checkpointing import CheckpointError, complete_tags, read_latest_tag
from megatron.checkpointing.integrity import CheckpointIntegrityError, find_damage, verified_tag
from megatron.checkpointing.lock import SaveDirBusyError, SaveDirLock, check_not_busy, lock_path
from megatron.checkpointing.resume import TrainProgress, prune_checkpoints, save_checkpoint
from megatron.checkpointing.save_dir import claim_save_dir
from megatron.neox_args import NeoXArgs

CONFIG = {
    "num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8,
    "data_path": "data/bundled/pystdlib_text_document", "train_micro_batch_size_per_gpu": 1,
    "lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer",
    "train_iters": 10,
}
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


class FakeEngine:
    """Writes a 64 KB weights file as DeepSpeed would for one rank; `error` is raised halfway through."""

    def __init__(self, error=None):
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        path = os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")
        torch.save({"module": {"w": torch.arange(16384.0)}, **client_state}, path)
        if self.error is not None:
            raise self.error


class DiskFullEngine:
    """Writes its weights file onto /dev/full (every write fails with ENOSPC): torch.save's real error."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        os.symlink("/dev/full", os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        torch.save({"module": {"w": torch.arange(16384.0)}}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


def make_args(tmp_path, **overrides):
    return NeoXArgs.from_dict(dict(CONFIG, save=str(tmp_path / "ckpt"), **overrides), world_size=1)


def test_damaged_tag_is_refused_naming_the_file_and_the_older_good_tag(tmp_path):
    """4 KB of garbage inside the weights file, same size: refused (today it loaded silently)."""
    args = make_args(tmp_path)
    save = args.checkpoint.save
    for step in (1, 2):
        save_checkpoint(FakeEngine(), args, TrainProgress(iteration=step))
    assert find_damage(os.path.join(save, "global_step2")) is None
    weights = os.path.join(save, "global_step2", "mp_rank_00_model_states.pt")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(os.urandom(4096))
    assert os.path.getsize(weights) == size
    with pytest.raises(CheckpointIntegrityError) as info:
        verified_tag(save, "global_step2", fallback=False)
    message = str(info.value)
    assert weights in message and "SHA-256" in message
    assert "global_step1" in message and "fallback_to_older_checkpoint" in message
    tag, warning = verified_tag(save, "global_step2", fallback=True)
    assert tag == "global_step1" and "damaged" in warning
    os.remove(os.path.join(save, "global_step1", "rng_state_rank0.pt"))  # now no good tag is left
    with pytest.raises(CheckpointIntegrityError, match="No older checkpoint"):
        verified_tag(save, "global_step2", fallback=True)


def test_truncated_file_and_old_markers(tmp_path):
    args = make_args(tmp_path)
    save = args.checkpoint.save
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=3))
    tag_dir = os.path.join(save, "global_step3")
    weights = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    with open(weights, "r+b") as handle:
        handle.truncate(100)
    assert "has 100 bytes" in find_damage(tag_dir)
    with open(os.path.join(tag_dir, "complete"), "w") as handle:
        handle.write("3\n")  # a marker written before checksums: loads unverified
    assert find_damage(tag_dir) is None


def test_disk_full_during_save_removes_the_partial_save_and_keeps_the_previous(tmp_path, monkeypatch):
    """Today: a `basic_ios::clear: iostream error` traceback, the partial save left, the disk still full."""
    import shutil
    from collections import namedtuple

    args = make_args(tmp_path)
    save = args.checkpoint.save
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=2))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30, 0))  # what a full disk reports
    for engine in (FakeEngine(error=OSError(errno.ENOSPC, "No space left on device")), DiskFullEngine()):
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(engine, args, TrainProgress(iteration=4))
        message = str(info.value)
        assert "disk holding" in message and "is full" in message and "global_step2" in message, message
        assert not os.path.exists(os.path.join(save, "global_step4.partial"))
        assert read_latest_tag(save) == "global_step2" and complete_tags(save) == ["global_step2"]


def test_pruning_keeps_the_tag_just_saved_and_the_one_latest_names(tmp_path):
    args = make_args(tmp_path)
    save = args.checkpoint.save
    for step in (1, 2, 3):
        save_checkpoint(FakeEngine(), args, TrainProgress(iteration=step))
    with open(os.path.join(save, "latest"), "w") as handle:
        handle.write("global_step1")  # the user went back to an older tag
    prune_checkpoints(save, keep_last_n=1, keep="global_step2")
    assert complete_tags(save) == ["global_step1", "global_step2", "global_step3"]
    prune_checkpoints(save, keep_last_n=1)
    assert complete_tags(save) == ["global_step1", "global_step3"]


def test_latest_never_moves_back(tmp_path):
    """A 2-step re-run into a directory of a 200-step run: today `latest` went from 200 back to 2."""
    args = make_args(tmp_path)
    save = args.checkpoint.save
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=200))
    with pytest.raises(CheckpointError, match="refusing to move .*latest back from global_step200 to global_step2"):
        save_checkpoint(FakeEngine(), args, TrainProgress(iteration=2))
    assert read_latest_tag(save) == "global_step200"


def test_fresh_run_over_checkpoints_is_refused_unless_overwrite(tmp_path):
    args = make_args(tmp_path)
    save_checkpoint(FakeEngine(), args, TrainProgress(iteration=200))
    with pytest.raises(CheckpointError, match="already holds checkpoints .*global_step200.*overwrite_checkpoints"):
        claim_save_dir(args.checkpoint, start_iteration=0)
    resumed = make_args(tmp_path, load=str(tmp_path / "ckpt"))
    assert claim_save_dir(resumed.checkpoint, start_iteration=200) is None
    other = make_args(tmp_path, load=str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="move `latest` back"):
        claim_save_dir(other.checkpoint, start_iteration=5)
    overwrite = make_args(tmp_path, overwrite_checkpoints=True)
    assert "deleted global_step200, latest" in claim_save_dir(overwrite.checkpoint, start_iteration=0)
    assert complete_tags(args.checkpoint.save) == []


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from megatron.checkpointing.lock import SaveDirLock
    lock = SaveDirLock({save!r}).acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def test_lock_second_run_stale_lock_and_release_on_kill(tmp_path):
    save = str(tmp_path / "ckpt")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=REPO, save=save)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SaveDirBusyError) as info:
            SaveDirLock(save).acquire()
        assert f"pid {holder.pid}" in str(info.value) and lock_path(save) in str(info.value)
        with pytest.raises(SaveDirBusyError):
            check_not_busy(save)
    finally:
        holder.kill()  # SIGKILL: no clean release, the kernel drops the lock
        holder.wait()
    check_not_busy(save)
    lock = SaveDirLock(save).acquire()
    assert f"pid {holder.pid}" in lock.stale_message()  # the dead holder's line is reported
    lock.release()
    with SaveDirLock(save) as again:
        assert again.stale_message() is None  # a clean release leaves no stale line
