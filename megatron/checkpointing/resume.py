"""Save and resume a training run around DeepSpeed's `engine.save_checkpoint` / `load_checkpoint`.

What a resume needs besides weights and optimizer state (which DeepSpeed stores): the iteration, how many
samples were consumed (the data position), and every RNG state (Python, numpy, torch CPU/CUDA, the
tensor-parallel RNG tracker), so that the run continues exactly as if it had never stopped.

Order of a save: every rank writes its files -> barrier -> rank 0 writes `neox_args.json` and the
`complete` marker -> rank 0 switches `latest` atomically -> rank 0 prunes old checkpoints -> barrier.
A crash anywhere before the switch leaves `latest` on the previous complete checkpoint.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpointing.layout import (
    CONFIG_FILE,
    PARTIAL_SUFFIX,
    REPLACED_SUFFIX,
    TAG_PATTERN,
    CheckpointError,
    complete_tags,
    model_states_path,
    read_latest_tag,
    rng_state_path,
    tag_for_iteration,
    torch_load,
    write_latest,
    zero3_consolidation_message,
    zero3_model_states_paths,
)
from megatron.checkpointing.integrity import checksums, verified_tag, write_complete_marker
from megatron.checkpointing.pipeline_weights import load_weights_across_layouts
from megatron.checkpointing.reshard import WEIGHTS_ONLY_MARKER
from megatron.checkpointing.save_dir import check_latest_moves_forward
from megatron.mpu.checks import first_error_message, from_rank0
from megatron.checkpointing.zero3 import check_state_matches, load_full_state_into_zero3


@dataclass
class TrainProgress:
    """Where the run stands; saved with every checkpoint."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def capture_rng_states() -> dict:
    from megatron.mpu.random import get_rng_tracker

    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict) -> None:
    from megatron.mpu.random import get_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])
    get_rng_tracker().set_states(states["tracker"])


def _save_failure_message(exc: BaseException, save_dir: str, partial: str) -> str:
    """One paragraph for an error while writing a checkpoint (disk full named as such)."""
    previous = read_latest_or_none(save_dir)
    kept = (f"the previous checkpoint {os.path.join(save_dir, previous)} is intact and `latest` still names it"
            if previous else "no earlier checkpoint exists in this directory")
    try:
        free = shutil.disk_usage(save_dir).free
    except OSError:
        free = None
    disk_full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or (
        free is not None and free < 64 * 2**20)
    if disk_full:
        return (f"save: the disk holding {save_dir} is full ({(free or 0) / 2**20:.0f} MiB free) while writing "
                f"checkpoint {os.path.basename(partial).removesuffix(PARTIAL_SUFFIX)}; the partial save {partial} "
                f"was removed and {kept}. Free space, lower keep_last_n_checkpoints, or set `save` to a "
                f"larger disk, then resume.")
    return (f"save: writing checkpoint {partial} failed: {exc.__class__.__name__}: {exc}. The partial save was "
            f"removed and {kept}; check that {save_dir} is writable, then resume.")


def _is_write_error(exc: RuntimeError) -> bool:
    """A RuntimeError of torch.save's writer (its wording in torch 2.x for a failed or short write)."""
    text = str(exc)
    return any(part in text for part in ("PytorchStreamWriter", "iostream error", "No space left", "unexpected pos",
                                         "file write failed"))


def read_latest_or_none(save_dir: str) -> str | None:
    try:
        return read_latest_tag(save_dir)
    except CheckpointError:
        return None


def save_checkpoint(engine, args, progress: TrainProgress) -> str:
    """Save the run at `progress.iteration` into `args.checkpoint.save`; returns the tag.

    Every rank writes into `<tag>.partial`; only when all are done does rank 0 write the `complete` marker
    (with every file's checksum, `integrity.py`), move it to `<tag>` (a complete checkpoint already there,
    from an earlier run at the same step, is first moved aside to `<tag>.replaced` and deleted last) and
    switch `latest`, which never moves back. A crash at any point leaves the previous complete checkpoints
    as they were; an I/O error (a full disk) removes the partial save and raises CheckpointError.
    """
    save_dir = args.checkpoint.save
    tag = tag_for_iteration(progress.iteration)
    partial, final = os.path.join(save_dir, tag + PARTIAL_SUFFIX), os.path.join(save_dir, tag)
    rank = _rank()
    problem = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            check_latest_moves_forward(save_dir, tag)
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted save of this same step
        except (CheckpointError, OSError) as exc:
            problem = str(exc) if isinstance(exc, CheckpointError) else _save_failure_message(exc, save_dir, partial)
    problem = first_error_message(problem)
    if problem:
        raise CheckpointError(problem)
    client_state = {"progress": asdict(progress)}
    try:
        engine.save_checkpoint(save_dir, tag=tag + PARTIAL_SUFFIX, client_state=client_state, save_latest=False)
        torch.save(capture_rng_states(), rng_state_path(save_dir, tag + PARTIAL_SUFFIX, rank))
    except (OSError, RuntimeError) as exc:  # torch.save reports write errors (a full disk) as RuntimeError
        if isinstance(exc, RuntimeError) and not _is_write_error(exc):
            raise  # not an I/O problem: keep the traceback
        problem = _save_failure_message(exc, save_dir, partial)
    problem = first_error_message(problem)
    if problem is None and rank == 0:
        try:
            with open(os.path.join(partial, CONFIG_FILE), "w") as handle:
                handle.write(args.serialize())
        except OSError as exc:
            problem = _save_failure_message(exc, save_dir, partial)
    problem = first_error_message(problem)
    files = checksums(partial) if problem is None else None  # every rank hashes its share of the files
    if problem is None and rank == 0:
        try:
            write_complete_marker(partial, progress.iteration, files)
        except OSError as exc:
            problem = _save_failure_message(exc, save_dir, partial)
        if problem is None:
            replaced = final + REPLACED_SUFFIX
            if os.path.isdir(final):
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(final, replaced)
            os.rename(partial, final)
            write_latest(save_dir, tag)
            shutil.rmtree(replaced, ignore_errors=True)
            prune_checkpoints(save_dir, args.checkpoint.keep_last_n_checkpoints, keep=tag)
    problem = first_error_message(problem)
    if problem:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        raise CheckpointError(problem)
    _barrier()
    return tag


def prune_checkpoints(save_dir: str, keep_last_n: int | None, keep: str | None = None) -> None:
    """Delete complete checkpoints beyond the newest `keep_last_n`, and partial saves older than latest.
    `keep` (the tag just saved) is never deleted, nor is the tag `latest` names."""
    complete = complete_tags(save_dir)
    newest_step = int(TAG_PATTERN.match(complete[-1]).group(1)) if complete else -1
    doomed = complete[:-keep_last_n] if keep_last_n else []
    for name in os.listdir(save_dir):
        match = TAG_PATTERN.match(name.removesuffix(PARTIAL_SUFFIX).removesuffix(REPLACED_SUFFIX))
        if match and name not in complete and int(match.group(1)) < newest_step:
            doomed.append(name)
    protected = {keep, read_latest_or_none(save_dir)}
    for name in doomed:
        if name not in protected:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def _check_optimizer_layout(saved_args, args, path: str) -> None:
    """Optimizer states load only into the same DeepSpeed optimizer wrapper and precision
    (`megatron.engine.deepspeed_optimizer_kind` follows DeepSpeed's own choice of wrapper)."""
    from megatron.engine.optimizer_kind import deepspeed_optimizer_kind

    saved_kind, kind = deepspeed_optimizer_kind(saved_args), deepspeed_optimizer_kind(args)
    saved_precision, precision = saved_args.derived.precision, args.derived.precision
    if saved_kind.wrapper != kind.wrapper or saved_precision != precision:
        raise CheckpointError(
            f"load: the optimizer states in {path} were written by DeepSpeed's {saved_kind}; this config uses "
            f"{kind} (DeepSpeed picks the wrapper from bf16/fp16, data_types.grad_accum_dtype, "
            f"zero_optimization.stage, zero_optimization.offload_optimizer and pipe_parallel_size). Match those "
            f"keys to the checkpoint's, or set finetune: true to load the weights only and start a new "
            f"optimizer.")


def _check_compatible(saved_args, args, path: str) -> None:
    """Refuse to load weights into a model of another shape, with a message naming the keys."""
    saved, current = asdict(saved_args.model), asdict(args.model)
    shape_keys = ["num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
                  "pos_emb", "norm", "activation", "no_weight_tying", "use_bias_in_norms",
                  "use_bias_in_attn_linear", "use_bias_in_mlp", "gpt_j_residual"]
    diffs = [f"{key}: checkpoint {saved[key]!r}, config {current[key]!r}" for key in shape_keys
             if saved[key] != current[key]]
    derived_keys = ["num_kv_heads", "intermediate_size", "padded_vocab_size"]
    saved_derived, current_derived = asdict(saved_args.derived), asdict(args.derived)
    diffs += [f"{key} (derived): checkpoint {saved_derived[key]!r}, config {current_derived[key]!r}"
              for key in derived_keys if saved_derived[key] != current_derived[key]]
    if saved_derived["padded_vocab_size"] != current_derived["padded_vocab_size"]:
        diffs.append("  (the vocabulary comes from tokenizer_type/vocab_file and make_vocab_size_divisible_by)")
    if saved_args.parallel.model_parallel_size != args.parallel.model_parallel_size:
        diffs.append(f"model_parallel_size: checkpoint {saved_args.parallel.model_parallel_size}, config "
                     f"{args.parallel.model_parallel_size} (reshard with tools/ckpts first)")
    saved_pp, pp = max(saved_args.parallel.pipe_parallel_size, 1), max(args.parallel.pipe_parallel_size, 1)
    if saved_pp != pp and not args.checkpoint.finetune:
        diffs.append(f"pipe_parallel_size: checkpoint {saved_pp}, config {pp} (optimizer states resume only at the "
                     f"same pipeline size; finetune: true loads the weights at any pipeline size)")
    if diffs:
        raise CheckpointError(f"load: the checkpoint at {path} was written for another model shape; "
                              f"make the config match it:\n  " + "\n  ".join(diffs))


def has_checkpoint(load_dir: str) -> bool:
    """True when `load_dir` has a `latest` pointer (whether it is usable is checked on load)."""
    return os.path.isfile(os.path.join(load_dir, "latest"))


def same_directory(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def no_checkpoint_message(load_dir: str, save_dir: str | None) -> str:
    return (f"load: {load_dir!r} holds no checkpoint (no `latest` file), and it is not this run's `save` "
            f"directory ({save_dir!r}), so it is not the first launch of a run that resumes itself: the path is "
            f"probably mistyped. Fix `load`, set `load` equal to `save` (starts from scratch the first time), "
            f"or remove `load`.")


def _verified_on_rank0(load_dir: str, tag: str, fallback: bool) -> str:
    """The tag to load after rank 0 checked the files' checksums (`integrity.verified_tag`), on every rank."""
    result = None
    if _rank() == 0:
        try:
            chosen, warning = verified_tag(load_dir, tag, fallback)
            result = ("ok", chosen, warning)
        except CheckpointError as err:
            result = ("error", str(err), None)
    kind, value, warning = from_rank0(result)
    if kind == "error":
        raise CheckpointError(value)
    if warning and _rank() == 0:
        print(warning, flush=True)
    return value


def load_checkpoint(engine, args) -> TrainProgress:
    """Resume from `args.checkpoint.load` (its `latest`); with `finetune`, load weights only.

    A `load` directory without any checkpoint starts the run from scratch (as GPT-NeoX does, so that one
    config both starts and resumes a run), except with `finetune`, which needs weights.
    """
    from megatron.neox_args import NeoXArgs

    load_dir = args.checkpoint.load
    if not has_checkpoint(load_dir) and not args.checkpoint.finetune:
        if not same_directory(load_dir, args.checkpoint.save):
            raise CheckpointError(no_checkpoint_message(load_dir, args.checkpoint.save))
        if _rank() == 0:
            print(f"load: no checkpoint in {load_dir!r} yet; starting from scratch", flush=True)
        return TrainProgress()
    tag = read_latest_tag(load_dir)
    tag = _verified_on_rank0(load_dir, tag, args.checkpoint.fallback_to_older_checkpoint)
    path = os.path.join(load_dir, tag)
    finetune = args.checkpoint.finetune
    if not finetune and os.path.isfile(os.path.join(path, WEIGHTS_ONLY_MARKER)):
        raise CheckpointError(f"load: {path} holds weights only (written by tools/ckpts/reshard.py: no optimizer, "
                              f"learning-rate or RNG states, so the run cannot resume exactly); set finetune: "
                              f"true to load its weights and start a new optimizer.")
    with open(os.path.join(path, CONFIG_FILE)) as handle:
        saved_args = NeoXArgs.from_serialized(handle.read())
    _check_compatible(saved_args, args, path)
    if not finetune:
        _check_optimizer_layout(saved_args, args, path)
    elif load_weights_across_layouts(engine, args, saved_args, load_dir, tag):
        return TrainProgress()  # another pipeline size: merged and re-split here (DeepSpeed reads its own only)
    elif _load_weights_without_deepspeed(engine, args, load_dir, tag, path):
        return TrainProgress()
    try:
        load_path, client_state = engine.load_checkpoint(
            load_dir, tag=tag, load_optimizer_states=not finetune, load_lr_scheduler_states=not finetune,
            load_module_only=finetune)
    except Exception as exc:
        raise CheckpointError(f"load: DeepSpeed could not read checkpoint {path}: {exc.__class__.__name__}: "
                              f"{exc}. The files may be corrupted; resume from an older tag by writing it "
                              f"into {os.path.join(load_dir, 'latest')}.") from None
    if load_path is None:
        raise CheckpointError(f"load: DeepSpeed found no checkpoint at {path}.")
    if finetune:
        return TrainProgress()
    _restore_rng_for_rank(load_dir, tag, saved_args.derived.world_size, args.derived.world_size)
    return TrainProgress(**client_state["progress"])


def _load_weights_without_deepspeed(engine, args, load_dir: str, tag: str, path: str) -> bool:
    """`finetune` across the ZeRO-3 boundary, where DeepSpeed's module-only load fails; returns whether the
    weights were loaded here (False: DeepSpeed's load applies).

    DeepSpeed under ZeRO-3 reads only ZeRO-3 partition files, and elsewhere only a full
    `mp_rank_XX_model_states.pt` carrying its own metadata. So: full weights into a ZeRO-3 model go through
    `zero3.load_full_state_into_zero3`; a ZeRO-3 checkpoint whose partitions were consolidated (the
    commands of `zero3_consolidation_message`) loads into an unpartitioned model with `load_state_dict`;
    one that was not stops with those commands. Either load refreshes the optimizer's fp32 masters from the
    new weights, as DeepSpeed does after its own module-only load.
    """
    zero3 = args.parallel.zero_optimization.get("stage", 0) == 3
    tp_rank = engine.mpu.get_tensor_model_parallel_rank() if engine.mpu is not None else 0
    full_weights = os.path.isfile(model_states_path(load_dir, tag, tp_rank))
    partitions = bool(zero3_model_states_paths(load_dir, tag, tp_rank))
    if not zero3 and partitions and not full_weights:
        raise CheckpointError(f"load: finetune into zero_optimization.stage "
                              f"{args.parallel.zero_optimization.get('stage', 0)} from "
                              + zero3_consolidation_message(load_dir, tag, tp_rank))
    if zero3 == partitions:  # ZeRO-3 partitions into ZeRO-3, or full weights into stage 0-2: DeepSpeed's load
        return False
    state = torch_load(model_states_path(load_dir, tag, tp_rank), "model weights")["module"]
    if zero3:
        load_full_state_into_zero3(engine.module, state, path)
    else:
        check_state_matches(engine.module, state, path)
        engine.module.load_state_dict(state)
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    return True


def _restore_rng_for_rank(load_dir: str, tag: str, saved_world: int, world: int) -> None:
    """Restore this rank's RNG states. A run resumed on more ranks than it was saved from has no states
    for the new ranks: those keep their seeded states (the data position is restored all the same), so
    dropout masks, not the data, differ from an uninterrupted run."""
    path = rng_state_path(load_dir, tag, _rank())
    if os.path.isfile(path) or saved_world == world:
        restore_rng_states(torch_load(path, "RNG states"))
    if saved_world != world and _rank() == 0:
        print(f"load: resuming on {world} ranks from a checkpoint of {saved_world} ranks; the data position "
              f"is exact, RNG states are restored only for ranks that existed", flush=True)
