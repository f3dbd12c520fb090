"""The configuration of a run: `NeoXArgs` (typed sections + derived values) and `ConfigError`.

See docs/CONFIG.md for every key (generated from sections.py by `python -m megatron.neox_args.docs`).
"""

from megatron.neox_args.arguments import NeoXArgs
from megatron.neox_args.errors import ConfigError, format_error
from megatron.neox_args.sections import (
    SECTIONS,
    CheckpointArgs,
    DataArgs,
    DerivedArgs,
    LauncherArgs,
    LoggingArgs,
    LRArgs,
    ModelArgs,
    OptimizerArgs,
    ParallelArgs,
    PrecisionArgs,
    TokenizerArgs,
    TrainingArgs,
)

__all__ = [
    "NeoXArgs", "ConfigError", "format_error", "SECTIONS",
    "ModelArgs", "ParallelArgs", "OptimizerArgs", "LRArgs", "DataArgs", "TokenizerArgs", "PrecisionArgs",
    "TrainingArgs", "CheckpointArgs", "LoggingArgs", "LauncherArgs", "DerivedArgs",
]
