"""Rotary embeddings against a complex-number reference; learned positions per sequence shard."""

import math

import pytest
import torch

from megatron.model.positional import LearnedPositionEmbedding, RotaryEmbedding, apply_rotary, share_rotary_tables


def complex_rotary_reference(x: torch.Tensor, rotary_ndims: int, base: float) -> torch.Tensor:
    """x [b, heads, s, d] in float64: dims j and j + r/2 form z = x_j + i x_{j+r/2}, multiplied by
    exp(i * pos * base^(-2j/r)); dims >= r pass through."""
    half = rotary_ndims // 2
    s = x.shape[2]
    out = x.clone()
    for pos in range(s):
        for j in range(half):
            angle = pos * base ** (-2.0 * j / rotary_ndims)
            z = torch.complex(x[..., pos, j], x[..., pos, j + half]) * complex(math.cos(angle), math.sin(angle))
            out[..., pos, j], out[..., pos, j + half] = z.real, z.imag
    return out


@pytest.mark.parametrize("rotary_pct,base", [(1.0, 10000), (0.25, 10000), (0.5, 500000)])
def test_rotary_matches_complex_reference(rotary_pct, base):
    head_dim = 16
    rope = RotaryEmbedding(head_dim, rotary_pct, base)
    assert rope.rotary_ndims == int(head_dim * rotary_pct)
    x = torch.randn(2, 3, 9, head_dim, dtype=torch.float64)
    cos, sin = rope.cos_sin(9, x.device)
    got = apply_rotary(x, cos.double(), sin.double())
    expected = complex_rotary_reference(x, rope.rotary_ndims, base)
    # cos/sin tables are fp32: 1e-6 relative error on O(1) values
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(got[..., rope.rotary_ndims:], x[..., rope.rotary_ndims:], atol=0, rtol=0)


def test_rotary_is_relative():
    """q.k after rotation depends only on the position difference."""
    rope = RotaryEmbedding(8, 1.0, 10000)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    cos, sin = (t.double() for t in rope.cos_sin(12, torch.device("cpu")))
    rq = apply_rotary(q.expand(1, 1, 12, 8), cos, sin)[0, 0]
    rk = apply_rotary(k.expand(1, 1, 12, 8), cos, sin)[0, 0]
    assert torch.allclose(rq[5] @ rk[2], rq[10] @ rk[7], atol=1e-6)


@pytest.mark.parametrize("rotary_pct,base", [(1.0, 10000), (0.25, 500000)])
def test_rotary_tables_are_the_per_call_computation(rotary_pct, base):
    """The kept tables hold what the per-call path computes (the same fp32 ops), for a prefix, for gathered
    positions restarting per document, and a sequence longer than the tables falls back to computing."""
    tabled, computed = RotaryEmbedding(16, rotary_pct, base, 32), RotaryEmbedding(16, rotary_pct, base)
    assert tabled.cos_table.shape == (32, tabled.rotary_ndims) and computed.cos_table is None
    for got, want in zip(tabled.cos_sin(20, torch.device("cpu")), computed.cos_sin(20, torch.device("cpu"))):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    positions = torch.tensor([[0, 1, 2, 0, 1, 5, 31], [3, 0, 1, 2, 3, 4, 0]])  # [b, s], restarting
    for got, want in zip(tabled.cos_sin_at(positions), computed.cos_sin_at(positions)):
        assert got.shape == (2, 7, tabled.rotary_ndims)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    longer = tabled.cos_sin(40, torch.device("cpu"))[0]  # past the tables' 32 rows: computed
    torch.testing.assert_close(longer, computed.cos_sin(40, torch.device("cpu"))[0], atol=0, rtol=0)


def test_share_rotary_tables_keeps_one_copy_of_alike_tables():
    class Layer(torch.nn.Module):
        def __init__(self, rotary):
            super().__init__()
            self.attention = torch.nn.Module()
            self.attention.rotary = rotary

    layers = torch.nn.ModuleList([Layer(RotaryEmbedding(16, 0.25, 10000, 64)) for _ in range(3)]
                                 + [Layer(RotaryEmbedding(16, 0.5, 10000, 64)), Layer(None)])
    share_rotary_tables(layers)
    first = layers[0].attention.rotary
    assert layers[1].attention.rotary is first and layers[2].attention.rotary is first
    assert layers[3].attention.rotary is not first  # other dims: its own tables
    assert layers[4].attention.rotary is None
    assert len(list(layers.buffers())) == 2 * 3  # inv_freq, cos_table, sin_table: twice, not four times
    assert layers.state_dict() == {}  # nothing persistent


def test_rotary_odd_dims_is_an_error():
    assert RotaryEmbedding(10, 0.25, 10000).rotary_ndims == 2  # int(2.5) = 2
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(12, 0.25, 10000)  # 3 dims cannot be paired


def test_learned_positions_offset_and_bounds():
    emb = LearnedPositionEmbedding(16, 4, torch.nn.init.normal_)
    shard = emb(4, offset=8)  # [4, 1, h]
    assert shard.shape == (4, 1, 4)
    assert torch.equal(shard[:, 0], emb.weight[8:12])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        emb(10, offset=8)
