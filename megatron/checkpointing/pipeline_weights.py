"""Model weights in either checkpoint layout, read, written and loaded without DeepSpeed.

Layouts of `<dir>/<tag>/` (both DeepSpeed's):

    pipe_parallel_size <= 1:  mp_rank_{tp:02d}_model_states.pt          {"module": GPTModel state dict (tp shard)}
    pipe_parallel_size  > 1:  layer_{spec:02d}-model_{tp:02d}-model_states.pt   one pipeline spec's state dict
                              mp_rank_{pp x tp rank:02d}_model_states.pt  {"module": None, optimizer, ...}

The specs are megatron/model/pipeline.py's (0 embedding, 1 + i transformer layer i, L + 1 final norm,
L + 2 untied output layer; the tied head copy is not written, DeepSpeed restores it from spec 0);
`pipeline.gpt_key` maps their keys to GPTModel's.

- `read_tp_state(load_dir, tag, tp_rank, args)`: one tensor rank's GPTModel state dict, either layout.
- `write_weights_checkpoint(output, tag, full, args, iteration, note)`: the full (TP=1) weights at
  `args`' model_parallel_size x pipe_parallel_size, weights only (tools/ckpts/reshard.py,
  convert_hf_to_neox.py): loads with `finetune: true`.
- `load_weights_across_layouts(engine, args, saved_args, load_dir, tag)`: `finetune` into another pipeline
  size (or from/to a pipeline checkpoint): the full weights, this rank's shard, into the engine's module.
"""

from __future__ import annotations

import glob
import os
import shutil
from importlib.metadata import version

import torch

from megatron.checkpointing.integrity import write_complete_marker
from megatron.checkpointing.layout import (
    CONFIG_FILE,
    PARTIAL_SUFFIX,
    CheckpointError,
    model_states_path,
    torch_load,
    write_latest,
)
from megatron.checkpointing.reshard import WEIGHTS_ONLY_MARKER


def layer_path(load_dir: str, tag: str, spec: int, tp_rank: int) -> str:
    return os.path.join(load_dir, tag, f"layer_{spec:02d}-model_{tp_rank:02d}-model_states.pt")


def is_pipeline_checkpoint(load_dir: str, tag: str) -> bool:
    return bool(glob.glob(os.path.join(load_dir, tag, "layer_*-model_*-model_states.pt")))


def read_tp_state(load_dir: str, tag: str, tp_rank: int, args) -> dict:
    """GPTModel state dict of tensor rank `tp_rank` (its shard), from either layout (module docstring)."""
    from megatron.model.pipeline import merge_spec_states

    num_layers = args.model.num_layers
    if max(args.parallel.pipe_parallel_size, 1) <= 1:
        return torch_load(model_states_path(load_dir, tag, tp_rank), "model weights")["module"]
    per_spec = {}
    for spec in range(num_layers + 3):
        path = layer_path(load_dir, tag, spec, tp_rank)
        if os.path.isfile(path):
            per_spec[spec] = torch_load(path, "pipeline layer weights")
        elif spec <= num_layers + 1 or args.model.no_weight_tying:
            raise CheckpointError(f"{path} is missing: the pipeline checkpoint {os.path.join(load_dir, tag)} is "
                                  f"incomplete (spec {spec} of {num_layers + 3}); resume from an older tag.")
    return merge_spec_states(per_spec, num_layers)


def deepspeed_model_states(module, args, iteration: int) -> dict:
    """The dict DeepSpeed 0.19's engine.save_checkpoint writes to mp_rank_XX_model_states.pt, with the
    weights of one rank (None in the pipeline layout) and no optimizer or scheduler state
    (`load_module_only` reads `module` and `dp_world_size`)."""
    tp, pp = args.parallel.model_parallel_size, max(args.parallel.pipe_parallel_size, 1)
    return {
        "module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
        "frozen_param_shapes": None, "shared_params": None, "frozen_param_fragments": None,
        "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
        "global_steps": iteration, "global_samples": iteration * args.derived.train_batch_size,
        "dp_world_size": args.derived.data_parallel_size, "mp_world_size": tp * pp if pp > 1 else tp,
        "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp},
        "ds_config": args.deepspeed_config(), "ds_version": version("deepspeed"),
    }


def write_weights_checkpoint(output: str, tag: str, full: dict, args, iteration: int, note: str) -> str:
    """Write the full weights `full` (TP=1 GPTModel state dict) at args' tp x pp into `output`/`tag`
    (atomically: `<tag>.partial` renamed when complete), with `neox_args.json`, the weights-only marker
    (its text: `note`) and `latest`. Returns the tag's directory."""
    from megatron.checkpointing.reshard import split_tp
    from megatron.model.pipeline import split_gpt_state

    tp, pp = args.parallel.model_parallel_size, max(args.parallel.pipe_parallel_size, 1)
    final = os.path.join(output, tag)
    if os.path.exists(final):
        raise CheckpointError(f"{final} exists already: choose another --output, or remove it first.")
    partial_tag = tag + PARTIAL_SUFFIX
    partial = os.path.join(output, partial_tag)
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted write
    os.makedirs(partial)
    for tp_rank, shard in enumerate(split_tp(full, args.model, args.derived, tp)):
        if pp == 1:
            torch.save(deepspeed_model_states(shard, args, iteration), model_states_path(output, partial_tag, tp_rank))
            continue
        for spec, state in split_gpt_state(shard, args.model.num_layers).items():
            torch.save(state, layer_path(output, partial_tag, spec, tp_rank))
        for pp_rank in range(pp):  # DeepSpeed names these by the rank in the pipe x tensor group
            torch.save(deepspeed_model_states(None, args, iteration),
                       model_states_path(output, partial_tag, pp_rank * tp + tp_rank))
    with open(os.path.join(partial, CONFIG_FILE), "w") as handle:
        handle.write(args.serialize())
    with open(os.path.join(partial, WEIGHTS_ONLY_MARKER), "w") as handle:
        handle.write(note.rstrip() + "\n")
    write_complete_marker(partial, iteration)  # with every file's checksum (integrity.py)
    os.rename(partial, final)
    write_latest(output, tag)
    return final


def load_weights_across_layouts(engine, args, saved_args, load_dir: str, tag: str) -> bool:
    """`finetune` where the checkpoint's pipeline size differs from the run's (DeepSpeed reads only its own
    layout): merge the checkpoint's weights, take this rank's tensor shard, copy it into the module (a
    PipelineModule stage through `pipeline.load_gpt_state`). Returns False, doing nothing, when the
    pipeline sizes agree (DeepSpeed's own module-only load applies)."""
    from megatron.checkpointing.reshard import read_merged_model_state, split_tp
    from megatron.model.pipeline import load_gpt_state

    saved_pp, pp = max(saved_args.parallel.pipe_parallel_size, 1), max(args.parallel.pipe_parallel_size, 1)
    if saved_pp == pp:
        return False
    full, _ = read_merged_model_state(load_dir, tag)
    tp = args.parallel.model_parallel_size
    tp_rank = engine.mpu.get_slice_parallel_rank() if engine.mpu is not None else 0
    shard = split_tp(full, args.model, args.derived, tp)[tp_rank]
    module = engine.module
    if pp > 1:
        load_gpt_state(module, shard, args.model.num_layers)
    else:
        from megatron.checkpointing.zero3 import check_state_matches

        check_state_matches(module, shard, os.path.join(load_dir, tag))
        module.load_state_dict(shard)
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    return True
