"""Data: Megatron/GPT-NeoX indexed datasets, GPT samples, blending, samplers and the bundled corpus.

Entry point for training: `build_train_valid_test_data_iterators` (see `megatron.data.loaders`).
"""

from megatron.data.loaders import (
    build_train_valid_test_data_iterators,
    build_train_valid_test_datasets,
    collate_samples,
    num_samples_needed,
    parse_split,
)

__all__ = [
    "build_train_valid_test_data_iterators",
    "build_train_valid_test_datasets",
    "collate_samples",
    "num_samples_needed",
    "parse_split",
]
