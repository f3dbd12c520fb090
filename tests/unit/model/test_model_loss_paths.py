"""GPTModel's loss entry point: forward(tokens, labels, loss_mask) returns the scalar loss, equal (fp32, 1e-5)
to loss(forward(tokens), labels, loss_mask) in value and in every parameter's gradient, with the fused
chunked output projection + cross entropy (several chunk sizes) and without it, tied and untied; forward
without labels still returns the [b, s, V] logits; evaluation under no_grad works; bad chunk sizes fail."""

import pytest
import torch

from megatron.model import GPTModel
from megatron.mpu.initialize import ParallelState
from model_test_utils import VOCAB, make_args

TOL = dict(atol=1e-5, rtol=1e-5)

CONFIGS = {
    "tied-sequential": dict(),
    "untied-parallel-residual": dict(no_weight_tying=True, gpt_j_residual=True, rotary_pct=0.25),
    "llama-untied": dict(no_weight_tying=True, norm="rmsnorm", activation="swiglu", num_kv_heads=2),
}
# (fused_cross_entropy, cross_entropy_chunk_size); b*s = 32 tokens: 5 does not divide it, 4096 > 32
LOSS_PATHS = [(False, 4096), (True, 4096), (True, 5), (True, 8), (True, 1)]


def _batch(b=2, s=16, seed=0, mask=True):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=gen)
    labels = torch.randint(0, VOCAB, (b, s), generator=gen)
    loss_mask = (torch.rand(b, s, generator=gen) > 0.3).float() if mask else torch.ones(b, s)
    return tokens, labels, loss_mask


def _model(config, **loss_options):
    model_args, derived = make_args(**CONFIGS[config], **loss_options)
    torch.manual_seed(0)
    return GPTModel(model_args, derived, ParallelState.single())


def _loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused,chunk", LOSS_PATHS)
def test_forward_with_labels_equals_loss_of_logits(config, fused, chunk):
    model = _model(config, fused_cross_entropy=fused, cross_entropy_chunk_size=chunk).train()
    tokens, labels, mask = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, model.loss(model(tokens), labels, mask))
    loss, grads = _loss_and_grads(model, model(tokens, labels, mask))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_no_mask_means_every_token_and_logits_unchanged(fused):
    model = _model("untied-parallel-residual", fused_cross_entropy=fused, cross_entropy_chunk_size=7)
    tokens, labels, ones = _batch(mask=False)
    logits = model(tokens)
    assert logits.shape == (2, 16, VOCAB) and logits.is_contiguous()
    torch.testing.assert_close(model(tokens, labels), model.loss(logits, labels, ones), **TOL)
    torch.testing.assert_close(model(tokens, labels, None), model(tokens, labels, ones), **TOL)


def test_fused_and_plain_models_agree_and_eval_under_no_grad():
    tokens, labels, mask = _batch(seed=3)
    results = []
    for fused in (False, True):
        model = _model("tied-sequential", fused_cross_entropy=fused, cross_entropy_chunk_size=6).eval()
        with torch.no_grad():
            loss = model(tokens, labels, mask)
        assert loss.grad_fn is None
        results.append(loss)
    torch.testing.assert_close(results[1], results[0], **TOL)


def test_bad_chunk_size_is_an_error():
    model_args, derived = make_args(cross_entropy_chunk_size=0)
    with pytest.raises(ValueError, match="cross_entropy_chunk_size"):
        GPTModel(model_args, derived, ParallelState.single())
