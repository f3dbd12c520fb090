"""fused_linear_cross_entropy (single process): the loss and the gradients of hidden and weight equal
F.cross_entropy on the full logits with the per-token mask weighting (fp32, 1e-5), for chunk sizes that
divide the token count or not, for a tied weight (shared with an embedding lookup) and an untied one,
for any upstream gradient; nothing is computed for backward under no_grad; bad inputs are errors."""

import pytest
import torch
import torch.nn.functional as F

from megatron.mpu import fused_linear_cross_entropy

N, H, V = 37, 16, 48
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(seed=0, n=N, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen, dtype=dtype)
    weight = (0.5 * torch.randn(V, H, generator=gen)).to(dtype)
    target = torch.randint(0, V, (n,), generator=gen)
    mask = (torch.rand(n, generator=gen) > 0.3).float()
    return hidden, weight, target, mask


def _reference(hidden, weight, target, mask):
    per_token = F.cross_entropy((hidden @ weight.t()).float(), target, reduction="none")
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, N, 4096])
@pytest.mark.parametrize("upstream", [1.0, 0.37])
def test_untied_loss_and_grads_equal_full_logits(chunk_size, upstream):
    hidden, weight, target, mask = _inputs()
    h_ref, w_ref, h, w = _leaf(hidden), _leaf(weight), _leaf(hidden), _leaf(weight)

    ref = _reference(h_ref, w_ref, target, mask)
    (ref * upstream).backward()
    loss = fused_linear_cross_entropy(h, w, target, mask / mask.sum(), None, chunk_size)
    (loss * upstream).backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(h.grad, h_ref.grad, **TOL)
    torch.testing.assert_close(w.grad, w_ref.grad, **TOL)


@pytest.mark.parametrize("chunk_size", [3, 7, 64])
def test_tied_weight_accumulates_both_uses(chunk_size):
    """W is also the input embedding: its gradient is the lookup's plus the loss's, through autograd."""
    _, weight, target, mask = _inputs(seed=1)
    tokens = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    proj = torch.randn(H, H, generator=torch.Generator().manual_seed(6)) / H ** 0.5
    grads = []
    for fused in (False, True):
        w = _leaf(weight)
        hidden = torch.tanh(F.embedding(tokens, w) @ proj)  # the hidden states depend on W too
        if fused:
            loss = fused_linear_cross_entropy(hidden, w, target, mask / mask.sum(), None, chunk_size)
        else:
            loss = _reference(hidden, w, target, mask)
        loss.backward()
        grads.append((loss.detach(), w.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    torch.testing.assert_close(grads[1][1], grads[0][1], **TOL)


def test_all_masked_and_single_grad_inputs():
    hidden, weight, target, _ = _inputs(seed=2)
    zeros = torch.zeros(N)
    h, w = _leaf(hidden), _leaf(weight)
    loss = fused_linear_cross_entropy(h, w, target, zeros, None, 8)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0

    # only the weight needs a gradient (e.g. frozen trunk) and only the hidden states
    mask = torch.ones(N) / N
    w = _leaf(weight)
    fused_linear_cross_entropy(hidden, w, target, mask, None, 8).backward()
    w_ref = _leaf(weight)
    _reference(hidden, w_ref, target, torch.ones(N)).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, **TOL)
    h = _leaf(hidden)
    fused_linear_cross_entropy(h, weight, target, mask, None, 8).backward()
    h_ref = _leaf(hidden)
    _reference(h_ref, weight, target, torch.ones(N)).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, **TOL)


def test_no_grad_computes_loss_only():
    hidden, weight, target, mask = _inputs(seed=3)
    h, w = _leaf(hidden), _leaf(weight)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, target, mask / mask.sum(), None, 5)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(hidden, weight, target, mask), **TOL)


def test_bf16_inputs_close_to_fp32():
    hidden, weight, target, mask = _inputs(seed=4)
    h, w = _leaf(hidden.bfloat16()), _leaf(weight.bfloat16())
    loss = fused_linear_cross_entropy(h, w, target, mask / mask.sum(), None, 8)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    h_ref, w_ref = _leaf(h.detach().float()), _leaf(w.detach().float())
    _reference(h_ref, w_ref, target, mask).backward()
    torch.testing.assert_close(loss, _reference(h_ref, w_ref, target, mask).detach(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(w.grad.float(), w_ref.grad, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(h.grad.float(), h_ref.grad, atol=2e-2, rtol=5e-2)


def test_bad_inputs_are_errors():
    hidden, weight, target, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, target, mask, None, 0)
    with pytest.raises(ValueError, match="must be"):
        fused_linear_cross_entropy(hidden, weight[:, :-1], target, mask, None, 8)
    with pytest.raises(ValueError, match="target"):
        fused_linear_cross_entropy(hidden, weight, target[:-1], mask, None, 8)
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), target, mask, None, 8)


def test_chunk_kernels_compile_to_one_graph_and_match_eager():
    """On CUDA the per-chunk softmax statistics and gradient run as compiled kernels (fullgraph); here the
    same functions are compiled for the CPU and must agree with eager execution (bf16 logits, fp32 math)."""
    from megatron.mpu.fused_cross_entropy import _softmax_grad, _softmax_stats

    torch.manual_seed(0)
    c, v = 16, 96
    z = torch.randn(c, v).bfloat16()
    m = z.amax(-1).float()
    local_t = torch.randint(0, v, (c, 1))
    outside = torch.rand(c) < 0.3
    scale = torch.rand(c)
    target_weight = (-torch.rand(c)).masked_fill(outside, 0.0)
    eager = _softmax_stats(z, m, local_t, outside) + (_softmax_grad(z, m, scale, local_t, target_weight),)
    compiled = (torch.compile(_softmax_stats, fullgraph=True)(z, m, local_t, outside)
                + (torch.compile(_softmax_grad, fullgraph=True)(z, m, scale, local_t, target_weight),))
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-6)
    assert eager[1][outside].abs().max() == 0  # the target logit comes only from the owning rank
    expected_grad = (torch.exp(z.float() - m[:, None]) * scale[:, None]).scatter_add(1, local_t, target_weight[:, None])
    torch.testing.assert_close(eager[2].float(), expected_grad.bfloat16().float())


def test_a_failing_compile_falls_back_to_the_eager_function_with_a_warning():
    from megatron.mpu.fused_cross_entropy import _CompiledWithEagerFallback

    def double(x):
        return 2 * x

    wrapped = _CompiledWithEagerFallback(double)

    def broken(*args):
        raise RuntimeError("triton not available")

    wrapped.compiled = broken
    with pytest.warns(UserWarning, match="compiling double failed .*triton not available.*running it eagerly"):
        assert wrapped(torch.ones(2)).tolist() == [2.0, 2.0]
    assert wrapped.compiled is None and wrapped(torch.ones(1)).tolist() == [2.0]


@pytest.mark.parametrize("chunk_size", [4, 4096])
def test_padding_rows_take_no_probability(chunk_size):
    """vocab_size < V: both cross entropies equal F.cross_entropy over the real columns only; the padding
    rows of W get a zero gradient (whatever their values)."""
    from megatron.mpu import vocab_parallel_cross_entropy

    real = 30
    hidden, weight, target, mask = _inputs(seed=2)
    target = target % real
    h_ref, w_ref = _leaf(hidden), _leaf(weight[:real])
    ref = _reference(h_ref, w_ref, target, mask)
    ref.backward()
    for fused in (True, False):
        h, w = _leaf(hidden), _leaf(weight)
        if fused:
            loss = fused_linear_cross_entropy(h, w, target, mask / mask.sum(), None, chunk_size, vocab_size=real)
        else:
            per_token = vocab_parallel_cross_entropy(h @ w.t(), target, None, vocab_size=real)
            loss = (per_token * mask).sum() / mask.sum()
        loss.backward()
        torch.testing.assert_close(loss, ref, **TOL)
        torch.testing.assert_close(h.grad, h_ref.grad, **TOL)
        torch.testing.assert_close(w.grad[:real], w_ref.grad, **TOL)
        assert torch.count_nonzero(w.grad[real:]) == 0
