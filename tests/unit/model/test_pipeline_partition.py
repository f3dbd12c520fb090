"""GPT-NeoX's default `pipe_partition_method: type:transformer|mlp` cuts our stages as `type:transformer`.

DeepSpeed's `type:<regex>` partitioning balances the specs whose class name matches the regex
(PipelineModule._find_layer_type); both regexes must select exactly the transformer layers.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from deepspeed.runtime.pipe.module import PipelineModule

from megatron.model.pipeline import PARTITION_METHODS, layer_specs
from megatron.mpu import ParallelState
from megatron.neox_args.sections import DerivedArgs, ModelArgs


def _matched(regex: str, specs) -> list[int]:
    return PipelineModule._find_layer_type(SimpleNamespace(_layer_specs=specs), regex)


def test_upstream_default_regex_selects_exactly_the_transformer_layers():
    model = ModelArgs(num_layers=3, hidden_size=32, num_attention_heads=4, no_weight_tying=False)
    derived = DerivedArgs(vocab_size=100, padded_vocab_size=128)
    specs = layer_specs(model, derived, ParallelState.single(), torch.float32, init_seed=1)
    names = [spec.typename.__name__ for spec in specs]
    transformer = [i for i, name in enumerate(names) if name == "TransformerLayer"]
    assert len(transformer) == 3 and len(names) > 3  # embedding, norm and head are specs too
    assert _matched("transformer|mlp", specs) == transformer == _matched("transformer", specs)
    assert "type:transformer|mlp" in PARTITION_METHODS
