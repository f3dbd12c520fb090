"""Causal attention against an explicit-mask reference; GQA against repeated-kv multi-head attention;
the fused grouped QKV layout against a per-head reference."""

import math

import pytest
import torch

from megatron.model.attention import ParallelSelfAttention, sdpa_causal_attention
from megatron.mpu.initialize import ParallelState

from model_test_utils import make_args


def explicit_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + M) v with M = -inf above the diagonal, in float64; kv heads already
    match q heads."""
    s, d = q.shape[-2], q.shape[-1]
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)  # [b, heads, s, s]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


@pytest.mark.parametrize("backend", [None, "math"])
def test_causal_attention_matches_explicit_mask(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 11, 8) for _ in range(3))
    got = sdpa_causal_attention(q, k, v, backend=backend)
    torch.testing.assert_close(got, explicit_causal_attention(q, k, v), atol=1e-5, rtol=0)


def test_gqa_equals_repeated_kv_mha():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 10, 8)
    k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)  # query head i uses kv head i // 3
    got = sdpa_causal_attention(q, k, v)
    k_rep, v_rep = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    torch.testing.assert_close(got, sdpa_causal_attention(q, k_rep, v_rep), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, explicit_causal_attention(q, k_rep, v_rep), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_kv_heads,rotary_pct", [(4, 1.0), (2, 0.5), (1, 0.25)])
def test_self_attention_layout_matches_per_head_reference(num_kv_heads, rotary_pct):
    """Rebuild the module's output from its weights with the documented grouped QKV layout."""
    from megatron.model.positional import apply_rotary

    model, derived = make_args(num_kv_heads=num_kv_heads, rotary_pct=rotary_pct)
    torch.manual_seed(0)
    attn = ParallelSelfAttention(model, derived, ParallelState.single()).eval()
    s, b, h, nq, d = 7, 2, model.hidden_size, model.num_attention_heads, model.hidden_size // 4
    x = torch.randn(s, b, h)
    with torch.no_grad():
        got = attn(x)
        qkv = torch.nn.functional.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias)  # [s, b, (nq+2nkv)d]
        r = nq // num_kv_heads
        groups = qkv.view(s, b, num_kv_heads, r + 2, d)
        heads = []
        cos, sin = attn.rotary.cos_sin(s, x.device)
        for i in range(nq):
            g = i // r
            q = groups[:, :, g, i % r].permute(1, 0, 2)[:, None]  # [b, 1, s, d]
            k = groups[:, :, g, r].permute(1, 0, 2)[:, None]
            v = groups[:, :, g, r + 1].permute(1, 0, 2)[:, None]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            heads.append(explicit_causal_attention(q, k, v)[:, 0])  # [b, s, d]
        ctx = torch.cat(heads, dim=-1).transpose(0, 1)  # [s, b, nq*d]
        expected = torch.nn.functional.linear(ctx, attn.linear_proj.weight, attn.linear_proj.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_attention_is_causal():
    model, derived = make_args()
    attn = ParallelSelfAttention(model, derived, ParallelState.single()).eval()
    x = torch.randn(9, 1, model.hidden_size)
    y = x.clone()
    y[6:] = torch.randn(3, 1, model.hidden_size)  # change the future only
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[:6], attn(y)[:6], atol=1e-6, rtol=0)
        assert not torch.allclose(attn(x)[6:], attn(y)[6:])


def test_flash_without_package_is_a_clear_error():
    from megatron.model.attention_kernels import import_flash_attn
    from megatron.neox_args import ConfigError

    model, derived = make_args(attention_impl="flash")
    if import_flash_attn() is not None:  # flash-attn installed: the message cannot be triggered
        return
    with pytest.raises(ConfigError, match="pip install flash-attn, or set attention_impl: sdpa"):
        ParallelSelfAttention(model, derived, ParallelState.single())


def test_bad_head_counts_are_errors():
    model, derived = make_args(num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        ParallelSelfAttention(model, derived, ParallelState.single())


@pytest.mark.parametrize("use_bias", [False, True])
def test_batch_major_output_is_projected_without_a_copy(use_bias):
    """A kernel output laid out `[b, s, heads, d]` (FlashAttention-4's, handed back as an `[s, b, ...]` view) is
    projected in that order: the same result as projecting a `[s, b]` copy, and the projection keeps the
    kernel's own tensor for its weight gradient, not a second copy of it."""
    model, derived = make_args(num_kv_heads=4, use_bias_in_attn_linear=use_bias)
    torch.manual_seed(0)
    attn = ParallelSelfAttention(model, derived, ParallelState.single())
    s, b = 7, 3
    batch_major = torch.randn(b, s, attn.num_local_heads, attn.head_dim, requires_grad=True)
    out = batch_major.transpose(0, 1)  # [s, b, heads, d] view, as fa4_attention returns it
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = attn.project(out)
    expected = attn.project(out.contiguous())  # the [s, b] path: a copy of the rows in that order
    assert got.shape == expected.shape == (s, b, model.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    weight_storage = attn.linear_proj.weight.untyped_storage().data_ptr()
    kept_inputs = [t for t in saved if t.untyped_storage().data_ptr() != weight_storage]
    assert kept_inputs and all(t.untyped_storage().data_ptr() == batch_major.untyped_storage().data_ptr()
                               for t in kept_inputs)
    (got.square().sum()).backward()
    grad_fast = (batch_major.grad.clone(), attn.linear_proj.weight.grad.clone())
    batch_major.grad, attn.linear_proj.weight.grad = None, None
    attn.project(batch_major.detach().transpose(0, 1).contiguous().requires_grad_()).square().sum().backward()
    torch.testing.assert_close(attn.linear_proj.weight.grad, grad_fast[1], atol=1e-5, rtol=1e-5)
