"""Tensor and sequence parallelism: the only package with tensor/sequence-parallel collectives.

Build a `ParallelState` once (`initialize_model_parallel`, or `ParallelState.single()` for one
process) and hand it, or its `tp_group`, to the layers. See docs/ARCHITECTURE.md.
"""

from . import grads, random
from .cross_entropy import vocab_parallel_cross_entropy
from .fused_cross_entropy import fused_linear_cross_entropy
from .grads import allreduce_sequence_parallel_grads, register_sequence_parallel_grad_hooks
from .initialize import DeepSpeedMPU, ParallelState, initialize_model_parallel
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    default_init_method,
    mark_sequence_parallel_param,
    mark_tensor_parallel_param,
)
from .mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .random import RNGStatesTracker, checkpoint, get_rng_tracker, model_parallel_seed

__all__ = [
    "ParallelState", "DeepSpeedMPU", "initialize_model_parallel",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "default_init_method", "mark_sequence_parallel_param", "mark_tensor_parallel_param",
    "vocab_parallel_cross_entropy", "fused_linear_cross_entropy",
    "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region", "gather_from_tensor_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "checkpoint",
    "allreduce_sequence_parallel_grads", "register_sequence_parallel_grad_hooks",
    "grads", "random",
]
