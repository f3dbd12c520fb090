"""Checkpoints: save/resume around DeepSpeed's engine, reading without DeepSpeed, HF conversion maps,
tensor-parallel resharding (reshard.py)."""

from megatron.checkpointing.layout import (
    CheckpointError,
    complete_tags,
    model_states_path,
    read_latest_tag,
    read_model_state,
)
from megatron.checkpointing.reshard import merge_tp_shards, read_merged_model_state, split_tp
from megatron.checkpointing.resume import load_checkpoint, save_checkpoint

__all__ = [
    "CheckpointError",
    "complete_tags",
    "load_checkpoint",
    "merge_tp_shards",
    "model_states_path",
    "read_latest_tag",
    "read_merged_model_state",
    "read_model_state",
    "save_checkpoint",
    "split_tp",
]
