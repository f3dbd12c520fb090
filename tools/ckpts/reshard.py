#!/usr/bin/env python
"""Change the tensor-parallel size (model_parallel_size) and the pipeline size (pipe_parallel_size) of a
checkpoint's weights.

    python tools/ckpts/reshard.py --load checkpoints/run1 [--tag global_step100] \\
        --output checkpoints/run1-tp1 --model-parallel-size 1 [--pipe-parallel-size 2]

Reads every tensor-parallel rank (and pipeline stage) of the tag (default: the one `latest` names), merges
them into the full weights and splits them into N tensor ranks (megatron/checkpointing/reshard.py states
the layout) and P stages. Writes `<output>/<tag>/` in DeepSpeed's format: `mp_rank_XX_model_states.pt`
for XX < N (P = 1), or one `layer_SS-model_XX-model_states.pt` per pipeline spec and tensor rank (P > 1,
megatron/checkpointing/pipeline_weights.py); `neox_args.json` (the saved config with model_parallel_size
N, pipe_parallel_size P, the same padded vocabulary and the make_vocab_size_divisible_by that gives it at
N, the same data-parallel size), a `weights_only` marker and the `complete` marker; then points
`<output>/latest` at it.

Weights only: optimizer states (and ZeRO partitions), learning-rate and RNG states are not resharded, so a
run loads it with `finetune: true` (without, the load stops and says so), `model_parallel_size: N` and the
printed make_vocab_size_divisible_by. Weights keep the dtype of the saved model (bf16/fp16 runs: the
16-bit weights, not the fp32 master copy). ZeRO stage 3 checkpoints hold partitions: consolidate first
(the error says how).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.checkpointing.integrity import marker_iteration  # noqa: E402
from megatron.checkpointing.layout import TAG_PATTERN, CheckpointError, read_latest_tag  # noqa: E402
from megatron.checkpointing.pipeline_weights import write_weights_checkpoint  # noqa: E402
from megatron.checkpointing.reshard import read_merged_model_state, resharded_args  # noqa: E402


def _iteration(load: str, tag: str) -> int:
    recorded = marker_iteration(os.path.join(load, tag))
    if recorded is not None:
        return recorded
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else 0


def reshard(load: str, output: str, model_parallel_size: int, tag: str | None = None,
            pipe_parallel_size: int | None = None):
    """Write checkpoint `load`/`tag` at `model_parallel_size` (and `pipe_parallel_size`, default: the saved
    one) into `output`; returns (tag, new NeoXArgs)."""
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load!r} is not a directory.")
    tag = tag or read_latest_tag(load)
    full, args = read_merged_model_state(load, tag)
    new_args = resharded_args(args, model_parallel_size, pipe_parallel_size)
    old_layout = f"model_parallel_size {args.parallel.model_parallel_size} x pipe_parallel_size " \
                 f"{max(args.parallel.pipe_parallel_size, 1)}"
    new_layout = f"{model_parallel_size} x {max(new_args.parallel.pipe_parallel_size, 1)}"
    write_weights_checkpoint(output, tag, full, new_args, _iteration(load, tag),
                             note=f"written by tools/ckpts/reshard.py from {os.path.join(load, tag)} ({old_layout} "
                                  f"-> {new_layout}): weights only, load with finetune: true")
    return tag, new_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="our checkpoint directory (the one holding `latest`)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step100 (default: latest)")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--model-parallel-size", type=int, required=True, help="the new tensor-parallel size")
    parser.add_argument("--pipe-parallel-size", type=int, default=None,
                        help="the new number of pipeline stages (default: the checkpoint's)")
    opts = parser.parse_args(argv)
    try:
        tag, args = reshard(opts.load, opts.output, opts.model_parallel_size, opts.tag, opts.pipe_parallel_size)
    except (CheckpointError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise SystemExit(f"reshard.py: error: {message}") from None
    print(f"wrote {os.path.join(opts.output, tag)} (weights only). Train from it with: load: {opts.output}, "
          f"finetune: true, model_parallel_size: {args.parallel.model_parallel_size}, pipe_parallel_size: "
          f"{args.parallel.pipe_parallel_size}, "
          f"make_vocab_size_divisible_by: {args.model.make_vocab_size_divisible_by}")


if __name__ == "__main__":
    main()
