"""Exact resume through deepy.py: the loss at every step after a resume equals the uninterrupted run's
(bitwise, CPU fp32), with dropout on so that restored RNG states matter; also after an interrupted save."""

import os
import shutil

from tests.e2e.harness import losses, run_deepy

DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


def test_resume_is_exact_and_survives_an_interrupted_save(tmp_path):
    full = losses(run_deepy(tmp_path, "full", {**DROPOUT, "train_iters": 8}))

    save = str(tmp_path / "ckpt")
    first = losses(run_deepy(tmp_path, "first", {**DROPOUT, "train_iters": 4, "save": save,
                                                 "checkpoint_factor": 4}))
    assert [first[i] for i in range(1, 5)] == [full[i] for i in range(1, 5)]
    assert open(os.path.join(save, "latest")).read().strip() == "global_step4"

    # What a crash in the middle of saving step 6 leaves behind: a tag directory with a truncated
    # weights file and no `complete` marker; `latest` was never switched.
    partial = os.path.join(save, "global_step6")
    shutil.copytree(os.path.join(save, "global_step4"), partial)
    os.remove(os.path.join(partial, "complete"))
    weights = os.path.join(partial, "mp_rank_00_model_states.pt")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 3)

    resumed = losses(run_deepy(tmp_path, "resumed", {**DROPOUT, "train_iters": 8, "load": save,
                                                     "save": save, "checkpoint_factor": 2}))
    assert sorted(resumed) == [5, 6, 7, 8]
    for it in resumed:
        assert resumed[it] == full[it], (it, resumed[it], full[it])  # bitwise
    # the resumed run's own save of step 6 replaced the partial directory
    assert os.path.isfile(os.path.join(save, "global_step6", "complete"))
    assert open(os.path.join(save, "latest")).read().strip() == "global_step8"


def test_finetune_loads_weights_only(tmp_path):
    save = str(tmp_path / "ckpt")
    trained = losses(run_deepy(tmp_path, "pre", {"train_iters": 6, "save": save, "checkpoint_factor": 6}))
    fresh = losses(run_deepy(tmp_path, "fresh", {"train_iters": 2}))
    tuned = losses(run_deepy(tmp_path, "tune", {"train_iters": 2, "load": save, "finetune": True}))
    assert sorted(tuned) == [1, 2]  # iteration count starts again
    # the weights came from the checkpoint: the first loss is the trained model's, not a fresh init's
    assert tuned[1] < trained[6] + 0.3 and tuned[1] < fresh[1] - 0.5, (tuned, trained, fresh)


def test_corrupted_checkpoint_is_a_clear_error_and_keeps_the_files(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.e2e.harness import REPO_ROOT, SMALL_MODEL
    from tests.helpers.distributed import find_free_port

    save = tmp_path / "ckpt"
    run_deepy(tmp_path, "pre", {"train_iters": 2, "save": str(save), "checkpoint_factor": 2})
    weights = save / "global_step2" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    before = sorted(p.name for p in (save / "global_step2").iterdir())
    config = dict(SMALL_MODEL, train_iters=4, load=str(save), save=str(save), log_dir=str(tmp_path / "run"),
                  master_port=find_free_port())
    path = tmp_path / "resume.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # refused by the checksums of its `complete` marker before DeepSpeed reads it
    assert "train.py: error: load: checkpoint" in proc.stderr and "is damaged" in proc.stderr, proc.stderr[-3000:]
    assert "mp_rank_00_model_states.pt has 100 bytes" in proc.stderr  # names the file
    assert "No older checkpoint" in proc.stderr and "remove `load`" in proc.stderr  # and the fix
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (save / "global_step2").iterdir()) == before  # nothing deleted
    assert (save / "latest").read_text().strip() == "global_step2"


def test_resume_on_more_ranks_keeps_the_global_batch_and_data_position(tmp_path):
    """Saved from 1 rank (micro 4 x grad_acc 2), resumed on 2 ranks (micro 4 x 1): same global batch, same
    samples, no dropout, so the losses continue as the 1-rank run's within fp32 reduction order (1e-5)."""
    import pytest

    one_rank = {"train_iters": 6, "gradient_accumulation_steps": 2}
    full = losses(run_deepy(tmp_path, "full", one_rank))
    save = str(tmp_path / "ckpt")
    run_deepy(tmp_path, "first", {**one_rank, "train_iters": 3, "save": save, "checkpoint_factor": 3})
    resumed = losses(run_deepy(tmp_path, "resumed", {"train_iters": 6, "num_gpus": 2, "load": save}))
    assert sorted(resumed) == [4, 5, 6]
    for it in resumed:
        assert resumed[it] == pytest.approx(full[it], rel=1e-5), (it, resumed[it], full[it])
