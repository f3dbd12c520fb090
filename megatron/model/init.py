"""Weight initialization: GPT-NeoX's methods, drawn so that the layout never changes the weights.

Each random weight is drawn, FULL and unpadded, from its own `torch.Generator` seeded by
`parameter_seed(seed, key)`, where `key` is the parameter's global identity: its name in the state dict
of the whole model at pipeline size 1 (`embedding.word_embeddings.weight`,
`layers.{global layer index}.attention.linear_qkv.weight`, `output_layer.weight`, ...). The tensor-
parallel layers then keep their own shard of that full tensor (megatron/mpu/layers.py) and vocabulary
padding rows are zero. So the initial model is a function of (seed, config) only: tensor parallelism
(which shard), pipeline parallelism (which stage builds which layers, in which order) and vocabulary
padding (a multiple of 128 x TP rows) change nothing, and no weight depends on how many were drawn before
it. Norm weights start at one and biases at zero (no randomness).

`init_fn(method, model)` without a key fills a tensor from the default torch generator (for tests of
single layers); `WeightInit(seed, prefix).fn(method, model, name)` is the keyed form the model uses.
Input-side weights (QKV, fc1/gate, embeddings, untied output head) use `model.init_method`; output-side
weights (attention output projection, fc2) use `model.output_layer_init_method`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

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
    if method == "single_residual_scaled_normal":  # one residual branch per layer (upstream's Mamba init)
        return model.init_method_std / math.sqrt(num_layers)
    raise ValueError(f"unknown init method {method!r}: choose normal, scaled_normal, "
                     f"single_residual_scaled_normal, small_init or wang_init")


def parameter_seed(seed: int, key: str) -> int:
    """The generator seed (63 bits) of the parameter named `key` in a run seeded with `seed`.

    blake2b of "seed/key": the same in every process and Python version (unlike `hash`), and unrelated
    for different keys, so parameters never share a random stream."""
    digest = hashlib.blake2b(f"{int(seed)}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_init_seed(init_seed: Optional[int]) -> int:
    """`init_seed`, or when None the seed the default torch generator was last seeded with
    (`torch.initial_seed()`: training.seed in a run, where `mpu.model_parallel_seed` sets it on every rank)."""
    return torch.initial_seed() if init_seed is None else int(init_seed)


def init_fn(method: str, model: ModelArgs, seed: Optional[int] = None,
            key: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that fills a tensor in place with N(0, init_std(method, model)^2).

    With `key` (and `seed`) every call draws from a fresh generator seeded by `parameter_seed(seed, key)`,
    on the tensor's device, so the values depend only on (seed, key, shape); without, from the default
    torch generator."""
    std = init_std(method, model)
    if key is not None and seed is None:
        raise ValueError(f"init_fn: key {key!r} needs the run's seed")

    def init_(weight: torch.Tensor) -> torch.Tensor:
        if weight.is_meta:  # no values to draw (shape-only models: dry-run parameter counts, shape checks)
            return weight
        generator = None
        if key is not None:
            generator = torch.Generator(device=weight.device).manual_seed(parameter_seed(seed, key))
        with torch.no_grad():
            return weight.normal_(mean=0.0, std=std, generator=generator)

    return init_


@dataclass(frozen=True)
class WeightInit:
    """The random source of one block of the model: the run's seed and the block's global prefix.

    `prefix` is the block's state-dict prefix in the whole model at pipeline size 1 ("embedding",
    "layers.7", "layers.7.attention"), so a pipeline stage that builds layer 7 draws the same weights as
    the full model does."""

    seed: int
    prefix: str

    def child(self, name: str) -> "WeightInit":
        return WeightInit(self.seed, f"{self.prefix}.{name}" if self.prefix else name)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fn(self, method: str, model: ModelArgs, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The init callable of parameter `name` (e.g. "linear_qkv.weight") of this block."""
        return init_fn(method, model, self.seed, self.key(name))
