"""Weight initialization methods (GPT-NeoX's names).

Each `init_fn(...)` returns a callable that fills a weight in place from the default torch generator.
Input-side weights (QKV, fc1/gate, embeddings, untied output head) use `model.init_method`; output-side
weights (attention output projection, fc2) use `model.output_layer_init_method`. Biases start at zero.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from megatron.neox_args.sections import ModelArgs


def init_std(method: str, model: ModelArgs) -> float:
    """The standard deviation of the normal distribution that `method` draws from."""
    h, num_layers = model.hidden_size, model.num_layers
    if method == "normal":
        return model.init_method_std
    if method == "small_init":
        return math.sqrt(2.0 / (5.0 * h))  # Nguyen & Salazar 2019
    if method == "wang_init":
        return 2.0 / (num_layers * math.sqrt(h))
    if method == "scaled_normal":
        return model.init_method_std / math.sqrt(2.0 * num_layers)
    raise ValueError(f"unknown init method {method!r}: choose normal, small_init, wang_init or scaled_normal")


def init_fn(method: str, model: ModelArgs) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that fills a tensor in place with N(0, init_std(method, model)^2)."""
    std = init_std(method, model)

    def init_(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.init.normal_(weight, mean=0.0, std=std)

    return init_
