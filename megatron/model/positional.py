"""Position information: rotary embeddings (RoPE) and learned absolute position embeddings.

Rotary follows the GPT-NeoX / Llama "rotate half" convention: on the first `rotary_ndims` dims of each
head, dimension j < rotary_ndims/2 is paired with dimension j + rotary_ndims/2 and the pair is rotated by
the angle position * base^(-2j/rotary_ndims). The remaining head dims pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE on the first `rotary_ndims` dims of each head."""

    def __init__(self, head_dim: int, rotary_pct: float, base: float):
        super().__init__()
        rotary_ndims = int(head_dim * rotary_pct)
        if rotary_ndims <= 0 or rotary_ndims % 2 != 0:
            raise ValueError(
                f"rotary needs an even, positive number of dims per head: int(head_dim {head_dim} * "
                f"rotary_pct {rotary_pct}) = {rotary_ndims}; pick rotary_pct so that it is even"
            )
        self.rotary_ndims = rotary_ndims
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float32) / rotary_ndims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary_ndims/2]

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables `[s, rotary_ndims]` for positions 0..seq_len-1, in fp32."""
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device))  # [s, rotary_ndims/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [s, rotary_ndims]
        return emb.cos(), emb.sin()

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables `[*positions.shape, rotary_ndims]` in fp32 for integer `positions` (any shape,
        e.g. `[s, b]` when positions restart at each document)."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)  # [..., r/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., rotary_ndims]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first r = cos.shape[-1] dims of each head of x `[..., d]` with cos/sin broadcastable to
    `x[..., :r]`: `[s, r]` for x `[b, heads, s, d]`, `[s, 1, 1, r]` for x `[s, b, heads, d]`."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


class LearnedPositionEmbedding(nn.Module):
    """A full `[max_positions, h]` table (replicated on every tensor rank).

    `forward(seq_len, offset)` returns the rows for positions offset..offset+seq_len-1 as `[s, 1, h]`:
    under sequence parallelism each rank asks only for its own shard's positions.
    """

    def __init__(self, max_positions: int, hidden_size: int, init_method, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, hidden_size, dtype=dtype))
        with torch.no_grad():
            init_method(self.weight)

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        if offset + seq_len > self.max_positions:
            raise ValueError(
                f"sequence of {offset + seq_len} tokens exceeds max_position_embeddings {self.max_positions}"
            )
        positions = torch.arange(offset, offset + seq_len, device=self.weight.device)
        return self.weight[positions].unsqueeze(1)  # [s, 1, h]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows of integer `positions` (any shape, e.g. `[s, b]`) -> `[*positions.shape, h]`."""
        return self.weight[positions]
