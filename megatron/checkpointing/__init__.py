"""Checkpoints: save/resume around DeepSpeed's engine, reading without DeepSpeed, HF conversion maps."""

from megatron.checkpointing.layout import (
    CheckpointError,
    complete_tags,
    model_states_path,
    read_latest_tag,
    read_model_state,
)
from megatron.checkpointing.resume import load_checkpoint, save_checkpoint

__all__ = [
    "CheckpointError",
    "complete_tags",
    "load_checkpoint",
    "model_states_path",
    "read_latest_tag",
    "read_model_state",
    "save_checkpoint",
]
