"""Normalization layers: LayerNorm (optional bias) and RMSNorm.

Under sequence parallelism a norm acts on the local sequence shard `[s/tp, b, h]`; each rank then holds
only part of its parameters' gradient, so `build_norm` marks weight and bias with
`mpu.mark_sequence_parallel_param` (exactly once; the gradients are summed over the tensor group by
`mpu.grads.allreduce_sequence_parallel_grads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.mpu.layers import mark_sequence_parallel_param
from megatron.neox_args.sections import ModelArgs


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight (+ bias), over the last dim."""

    def __init__(self, dim: int, eps: float, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, computed in fp32 (as Llama)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def build_norm(model: ModelArgs, sequence_parallel: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The norm the config asks for, its parameters marked for the sequence-parallel gradient sum."""
    if model.norm == "layernorm":
        norm = LayerNorm(model.hidden_size, model.layernorm_epsilon, bias=model.use_bias_in_norms, dtype=dtype)
    elif model.norm == "rmsnorm":
        norm = RMSNorm(model.hidden_size, model.rms_norm_epsilon, dtype=dtype)
    else:
        raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {model.norm!r}")
    if sequence_parallel:
        for p in norm.parameters():
            mark_sequence_parallel_param(p)
    return norm
