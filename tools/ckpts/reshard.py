#!/usr/bin/env python
"""Change the tensor-parallel size (model_parallel_size) of a checkpoint's weights.

    python tools/ckpts/reshard.py --load checkpoints/run1 [--tag global_step100] \\
        --output checkpoints/run1-tp1 --model-parallel-size 1

Reads every tensor-parallel rank of the tag (default: the one `latest` names), merges the shards into the
full weights and splits them into N ranks (megatron/checkpointing/reshard.py states the layout). Writes
`<output>/<tag>/`: `mp_rank_XX_model_states.pt` for XX < N in DeepSpeed's format, `neox_args.json` (the
saved config with model_parallel_size N, the same padded vocabulary and the make_vocab_size_divisible_by
that gives it at N, the same data-parallel size), a `weights_only` marker and the `complete` marker; then
points `<output>/latest` at it.

Weights only: optimizer states (and ZeRO partitions), learning-rate and RNG states are not resharded, so a
run loads it with `finetune: true` (without, the load stops and says so), `model_parallel_size: N` and the
printed make_vocab_size_divisible_by. Weights keep the dtype of the saved model (bf16/fp16 runs: the
16-bit weights, not the fp32 master copy). ZeRO stage 3 checkpoints hold partitions: consolidate first
(the error says how).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib.metadata import version

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from megatron.checkpointing.layout import (  # noqa: E402
    COMPLETE_MARKER,
    CONFIG_FILE,
    PARTIAL_SUFFIX,
    TAG_PATTERN,
    CheckpointError,
    model_states_path,
    read_latest_tag,
    write_latest,
)
from megatron.checkpointing.reshard import (  # noqa: E402
    WEIGHTS_ONLY_MARKER,
    read_merged_model_state,
    resharded_args,
    split_tp,
)


def deepspeed_model_states(module: dict, args, iteration: int) -> dict:
    """The dict DeepSpeed 0.19's engine.save_checkpoint writes to mp_rank_XX_model_states.pt, with the
    weights of one rank and no optimizer or scheduler state (`load_module_only` reads `module` and
    `dp_world_size`)."""
    tp = args.parallel.model_parallel_size
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": None,
        "frozen_param_shapes": None,
        "shared_params": None,
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * args.derived.train_batch_size,
        "dp_world_size": args.derived.data_parallel_size,
        "mp_world_size": tp,
        "checkpoint_parallel_dimensions": {"pp_degree": max(args.parallel.pipe_parallel_size, 1), "tp_degree": tp},
        "ds_config": args.deepspeed_config(),
        "ds_version": version("deepspeed"),
    }


def _iteration(load: str, tag: str) -> int:
    with open(os.path.join(load, tag, COMPLETE_MARKER)) as handle:
        text = handle.read().strip()
    if text.isdigit():
        return int(text)
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else 0


def reshard(load: str, output: str, model_parallel_size: int, tag: str | None = None):
    """Write checkpoint `load`/`tag` at `model_parallel_size` into `output`; returns (tag, new NeoXArgs)."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load!r} is not a directory.")
    tag = tag or read_latest_tag(load)
    full, args = read_merged_model_state(load, tag)
    new_args = resharded_args(args, model_parallel_size)
    shards = split_tp(full, args.model, args.derived, model_parallel_size)
    final = os.path.join(output, tag)
    if os.path.exists(final):
        raise CheckpointError(f"{final} exists already: choose another --output, or remove it first.")
    partial_tag = tag + PARTIAL_SUFFIX
    partial = os.path.join(output, partial_tag)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    iteration = _iteration(load, tag)
    for rank, shard in enumerate(shards):
        torch.save(deepspeed_model_states(shard, new_args, iteration), model_states_path(output, partial_tag, rank))
    with open(os.path.join(partial, CONFIG_FILE), "w") as handle:
        handle.write(new_args.serialize())
    with open(os.path.join(partial, WEIGHTS_ONLY_MARKER), "w") as handle:
        handle.write(f"written by tools/ckpts/reshard.py from {os.path.join(load, tag)} (model_parallel_size "
                     f"{args.parallel.model_parallel_size} -> {model_parallel_size}): weights only, load with "
                     f"finetune: true\n")
    with open(os.path.join(partial, COMPLETE_MARKER), "w") as handle:
        handle.write(f"{iteration}\n")
    os.rename(partial, final)
    write_latest(output, tag)
    return tag, new_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="our checkpoint directory (the one holding `latest`)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step100 (default: latest)")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--model-parallel-size", type=int, required=True, help="the new tensor-parallel size")
    opts = parser.parse_args(argv)
    try:
        tag, args = reshard(opts.load, opts.output, opts.model_parallel_size, opts.tag)
    except (CheckpointError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise SystemExit(f"reshard.py: error: {message}") from None
    print(f"wrote {os.path.join(opts.output, tag)} (weights only). Train from it with: load: {opts.output}, "
          f"finetune: true, model_parallel_size: {args.parallel.model_parallel_size}, "
          f"make_vocab_size_divisible_by: {args.model.make_vocab_size_divisible_by}")


if __name__ == "__main__":
    main()
