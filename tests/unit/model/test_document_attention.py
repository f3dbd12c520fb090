"""Document-aware attention and sliding windows, exact (fp32) against per-document references.

- the data side: loss mask, position ids and cu_seqlens of a hand-written batch;
- the CPU kernel (`reference_attention`) against a dense softmax over explicitly allowed pairs, forward
  and gradients, with GQA, documents, a window, and both;
- the whole GPTModel on a packed batch (reset_attention_mask + reset_position_ids) against the same
  model run on each document alone: logits and every parameter's gradient (rotary and learned positions).
"""

import pytest
import torch

from megatron.data.doc_masks import DocumentMasking, document_fields
from megatron.data.loaders import collate_samples
from megatron.model import GPTModel
from megatron.model.attention_kernels import causal_attention, reference_attention
from megatron.mpu.initialize import ParallelState
from megatron.neox_args.sections import ModelArgs
from model_test_utils import VOCAB, make_args

EOD = 0
TOL = 1e-5  # fp32


def test_document_fields_of_a_hand_written_batch():
    tokens = torch.tensor([[5, 6, EOD, 7, 8, EOD, 9],
                           [EOD, 1, 2, 3, EOD, 4, 5]])
    out = document_fields(tokens, DocumentMasking(EOD, True, True, True))
    assert out["loss_mask"].tolist() == [[1, 1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 0, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 3, 0, 1]]
    # row 0: docs [0,3) [3,6) [6,7); row 1 (offset 7): [7,8) [8,12) [12,14)
    assert out["cu_seqlens"].tolist() == [0, 3, 6, 7, 8, 12, 14] and out["cu_seqlens"].dtype == torch.int32
    assert out["max_seqlen"] == 4
    plain = document_fields(tokens, DocumentMasking())
    assert set(plain) == {"loss_mask"} and plain["loss_mask"].eq(1).all()
    only_loss = document_fields(tokens, DocumentMasking(EOD, eod_mask_loss=True))
    assert set(only_loss) == {"loss_mask"}
    with pytest.raises(ValueError, match="end-of-document id"):
        DocumentMasking(None, reset_attention_mask=True)


def test_collate_delivers_the_document_fields():
    samples = [{"text": torch.tensor([5, EOD, 7, 8, 9]).numpy()}, {"text": torch.tensor([1, 2, EOD, 3, 4]).numpy()}]
    batch = collate_samples(samples, DocumentMasking(EOD, reset_attention_mask=True, reset_position_ids=True))
    assert batch["tokens"].tolist() == [[5, EOD, 7, 8], [1, 2, EOD, 3]]
    assert batch["cu_seqlens"].tolist() == [0, 2, 4, 7, 8] and batch["max_seqlen"] == 3
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 2, 0]]


def dense_reference(q, k, v, cu_seqlens=None, window=None):
    """softmax over the explicitly allowed (i, j) of each row, by hand: q [s, b, nq, d] -> [s, b, nq, d]."""
    s, b, nq, d = q.shape
    k = k.repeat_interleave(nq // k.shape[2], dim=2)
    v = v.repeat_interleave(nq // v.shape[2], dim=2)
    doc = torch.zeros(b * s, dtype=torch.long)
    if cu_seqlens is not None:
        for n, start in enumerate(cu_seqlens[:-1].tolist()):
            doc[start:] = n
    doc = doc.view(b, s)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    out = torch.empty_like(q)
    for row in range(b):
        allowed = (j <= i) & (doc[row][:, None] == doc[row][None, :])
        if window is not None:
            allowed &= j >= i - window
        scores = torch.einsum("qhd,khd->hqk", q[:, row], k[:, row]) / d ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[:, row] = torch.einsum("hqk,khd->qhd", probs, v[:, row])
    return out


@pytest.mark.parametrize("docs, window, nkv", [
    (True, None, 4), (True, None, 2), (False, 3, 4), (True, 3, 2), (False, None, 4)])
def test_reference_kernel_matches_dense_softmax(docs, window, nkv):
    torch.manual_seed(0)
    s, b, nq, d = 13, 2, 4, 8
    q = torch.randn(s, b, nq, d, requires_grad=True)
    k = torch.randn(s, b, nkv, d, requires_grad=True)
    v = torch.randn(s, b, nkv, d, requires_grad=True)
    cu = torch.tensor([0, 4, 9, 13, 15, 26], dtype=torch.int32) if docs else None
    got = reference_attention(q, k, v, cu, window, block=5)  # blocks smaller than a document
    want = dense_reference(q, k, v, cu, window)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), grad)
    g_want = torch.autograd.grad(want, (q, k, v), grad)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, atol=TOL, rtol=0)
    # the dispatcher picks this path on CPU for documents / windows, plain SDPA otherwise
    torch.testing.assert_close(causal_attention(q, k, v, cu_seqlens=cu, max_seqlen=11, window=window), want,
                               atol=TOL, rtol=0)


def _docs_of(tokens_row):
    """[(start, end)] of the documents of one row (each ends after an EOD)."""
    bounds, start = [], 0
    for i, t in enumerate(tokens_row.tolist()):
        if t == EOD:
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(tokens_row):
        bounds.append((start, len(tokens_row)))
    return bounds


@pytest.mark.parametrize("overrides", [
    dict(rotary_pct=0.5, gpt_j_residual=True),
    dict(pos_emb="learned", num_kv_heads=2, activation="swiglu", norm="rmsnorm"),
    dict(rotary_pct=1.0, mlp_chunk_size=3),
])
def test_packed_model_equals_each_document_alone(overrides):
    model_args, derived = make_args(num_layers=2, **overrides)
    torch.manual_seed(5)
    model = GPTModel(model_args, derived, ParallelState.single())
    tokens = torch.randint(1, VOCAB, (2, 16))
    tokens[0, [3, 9]] = EOD
    tokens[1, [0, 6, 7, 15]] = EOD
    fields = document_fields(tokens, DocumentMasking(EOD, reset_attention_mask=True, reset_position_ids=True))

    logits = model(tokens, position_ids=fields["position_ids"], cu_seqlens=fields["cu_seqlens"],
                   max_seqlen=fields["max_seqlen"])  # [b, s, V]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    expected = torch.empty_like(logits)
    total = 0.0
    for row in range(2):
        for start, end in _docs_of(tokens[row]):
            alone = model(tokens[row:row + 1, start:end])  # [1, n, V], positions 0..n-1
            expected[row, start:end] = alone[0].detach()
            total = total + (alone[0] * weights[row, start:end]).sum()
    total.backward()
    torch.testing.assert_close(logits.detach(), expected, atol=TOL, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=TOL, rtol=1e-4, msg=name)
    # negative control: without the document boundaries the packed logits differ
    with torch.no_grad():
        assert not torch.allclose(model(tokens, position_ids=fields["position_ids"]), expected, atol=1e-3)


def test_sliding_window_attention_layer_sees_only_its_window():
    """sliding_window_width w = 4: query i reads keys i - 4 .. i. Changing tokens 0..4 leaves outputs 9..15
    unchanged and changes output 8 (it reads key 4)."""
    from megatron.model.attention import ParallelSelfAttention

    model_args, derived = make_args(sliding_window_width=4)
    torch.manual_seed(2)
    attn = ParallelSelfAttention(model_args, derived, ParallelState.single())
    x = torch.randn(16, 2, model_args.hidden_size)
    y = attn(x)
    # moving a token more than w positions back leaves the output unchanged
    x2 = x.clone()
    x2[:5] = torch.randn(5, 2, model_args.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(attn(x2)[9:], y[9:].detach(), atol=TOL, rtol=0)
        assert not torch.allclose(attn(x2)[8], y[8].detach(), atol=1e-4)


def test_attention_layer_rejects_a_window_on_sdpa_with_an_old_torch(monkeypatch):
    from megatron.model import attention_support
    from megatron.neox_args import ConfigError

    monkeypatch.setattr(attention_support, "torch_varlen_has_window", lambda: False)
    model = ModelArgs(sliding_window_width=8)
    attention_support.check_attention_support(model, device_type="cpu")  # CPU path has windows
    with pytest.raises(ConfigError, match="torch >= 2.12"):
        attention_support.check_attention_support(model, device_type="cuda")
