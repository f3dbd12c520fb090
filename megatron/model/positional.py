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
    """cos/sin tables for RoPE on the first `rotary_ndims` dims of each head.

    With `max_positions` the tables of positions 0..max_positions-1 are computed once, in fp32, and kept
    as (non-persistent) buffers `cos_table`, `sin_table` `[max_positions, rotary_ndims]`
    (8 * max_positions * rotary_ndims bytes; one copy per model: `share_rotary_tables`). A layer then reads
    its rows instead of evaluating cos and sin per element: compiled, inductor otherwise inlines the table
    into the rotary kernel and computes two accurate fp32 transcendentals for every q and k element (the
    410M forward's rotary kernel was compute-bound on them). Without it, or for a longer sequence, the
    tables are computed per call as before.
    """

    def __init__(self, head_dim: int, rotary_pct: float, base: float, max_positions: int | None = None):
        super().__init__()
        rotary_ndims = int(head_dim * rotary_pct)
        if rotary_ndims <= 0 or rotary_ndims % 2 != 0:
            raise ValueError(
                f"rotary needs an even, positive number of dims per head: int(head_dim {head_dim} * "
                f"rotary_pct {rotary_pct}) = {rotary_ndims}; pick rotary_pct so that it is even"
            )
        self.rotary_ndims = rotary_ndims
        self.shape_key = (rotary_ndims, float(base), max_positions or 0)  # alike tables: share_rotary_tables
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float32) / rotary_ndims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary_ndims/2]
        cos = sin = None
        if max_positions:
            cos, sin = self._compute(torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device))
        self.register_buffer("cos_table", cos, persistent=False)  # [max_positions, rotary_ndims] fp32, or None
        self.register_buffer("sin_table", sin, persistent=False)

    def _compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[*positions.shape, rotary_ndims]` in fp32 of float or integer `positions`."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)  # [..., r/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., rotary_ndims]
        return emb.cos(), emb.sin()

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables `[s, rotary_ndims]` for positions 0..seq_len-1, in fp32."""
        if self.cos_table is not None and seq_len <= self.cos_table.shape[0]:
            return self.cos_table[:seq_len], self.sin_table[:seq_len]
        return self._compute(torch.arange(seq_len, device=device, dtype=torch.float32))

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables `[*positions.shape, rotary_ndims]` in fp32 for integer `positions` (any shape,
        e.g. `[s, b]` when positions restart at each document); with the tables each position must be
        below `max_positions` (as for learned position embeddings)."""
        if self.cos_table is not None:
            return self.cos_table[positions], self.sin_table[positions]
        return self._compute(positions)


def share_rotary_tables(layers) -> None:
    """Point the attention of every layer in `layers` (TransformerLayers, or anything with
    `.attention.rotary`) at the first one's RotaryEmbedding where theirs is alike (same dims, base and
    table rows): one copy of the tables per model (or pipeline stage) instead of one per layer. They hold
    no weights and no persistent state, so checkpoints and parameter lists are unchanged."""
    first = None
    for layer in layers:
        rotary = getattr(getattr(layer, "attention", None), "rotary", None)
        if rotary is None:
            continue
        if first is None:
            first = rotary
        elif rotary.shape_key == first.shape_key:
            layer.attention.rotary = first


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
