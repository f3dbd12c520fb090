"""The initial model depends on the seed and the config only (megatron/model/init.py):

- every random weight equals a fresh draw from the generator keyed by (seed, its state-dict name), so
  the key is the parameter's global identity (norms start at one, biases at zero);
- vocabulary padding changes nothing: the real rows are the same at any padded size, padding rows are
  zero, and the loss (fused and plain), the logits of the real ids and every gradient are the same
  (fp32, 1e-6), with zero gradient on the padding rows and -inf logits for the padding ids;
- a pipeline stage that builds only some blocks (`Embedding`, `TransformerLayer(layer_index=i)`,
  `build_output_layer`), in any order, gets exactly the whole model's weights for them.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTModel
from megatron.model.gpt import Embedding, TransformerLayer, build_output_layer
from megatron.model.init import init_std, parameter_seed
from megatron.mpu.initialize import ParallelState
from model_test_utils import make_args

SEED = 4321
CONFIGS = {
    "neox-untied-learned": dict(no_weight_tying=True, pos_emb="learned", init_method="small_init",
                                output_layer_init_method="wang_init"),
    "llama-swiglu-gqa-tied": dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm", use_bias_in_mlp=False),
}
OUTPUT_SIDE = ("linear_proj.weight", "linear_fc2.weight")


def _build(overrides, vocab=100, padded=128, seed=SEED):
    model, derived = make_args(**overrides)
    derived.vocab_size, derived.padded_vocab_size = vocab, padded
    return GPTModel(model, derived, ParallelState.single(), init_seed=seed), model, derived


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_weight_is_the_draw_keyed_by_its_name(name):
    gpt, model, derived = _build(CONFIGS[name])
    random_weights = 0
    for key, param in gpt.state_dict().items():
        if key.endswith("bias"):
            assert torch.count_nonzero(param) == 0, key
        elif "norm" in key:
            assert torch.equal(param, torch.ones_like(param)), key
        else:
            method = model.output_layer_init_method if key.endswith(OUTPUT_SIDE) else model.init_method
            rows = derived.vocab_size if "word_embeddings" in key or key.startswith("output_layer") else param.shape[0]
            gen = torch.Generator().manual_seed(parameter_seed(SEED, key))
            expected = torch.zeros_like(param)
            expected[:rows].normal_(0.0, init_std(method, model), generator=gen)
            assert torch.equal(param, expected), key
            random_weights += 1
    assert random_weights >= 2 + 4 * model.num_layers  # embedding(s), head and every layer's matrices


def _loss_logits_grads(gpt, fused, tokens, labels, mask):
    gpt.fused_cross_entropy = fused
    gpt.zero_grad()
    loss = gpt(tokens, labels, mask)
    loss.backward()
    with torch.no_grad():
        logits = gpt(tokens)
    return loss.detach(), logits, {k: p.grad.clone() for k, p in gpt.named_parameters()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("fused", [True, False])
def test_vocabulary_padding_changes_nothing(name, fused):
    vocab = 100
    small, model, _ = _build(CONFIGS[name], vocab=vocab, padded=128)
    large, _, _ = _build(CONFIGS[name], vocab=vocab, padded=384)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, vocab, (2, 16), generator=gen), torch.randint(0, vocab, (2, 16), generator=gen)
    mask = (torch.rand(2, 16, generator=gen) > 0.2).float()

    for key, param in large.state_dict().items():
        ref = small.state_dict()[key]
        if param.shape != ref.shape:  # vocabulary rows: the real ones equal, the padding zero
            assert torch.equal(param[:vocab], ref[:vocab]) and torch.count_nonzero(param[vocab:]) == 0, key
        else:
            assert torch.equal(param, ref), key

    loss_s, logits_s, grads_s = _loss_logits_grads(small, fused, tokens, labels, mask)
    loss_l, logits_l, grads_l = _loss_logits_grads(large, fused, tokens, labels, mask)
    torch.testing.assert_close(loss_l, loss_s, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_l[..., :vocab], logits_s[..., :vocab], atol=1e-6, rtol=0)
    assert torch.isneginf(logits_l[..., vocab:]).all() and torch.isneginf(logits_s[..., vocab:]).all()
    # the loss is the cross entropy over the real vocabulary alone
    plain = F.cross_entropy(logits_s[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss_s, (plain * mask.reshape(-1)).sum() / mask.sum(), atol=1e-6, rtol=0)
    for key, grad in grads_l.items():
        ref = grads_s[key]
        if grad.shape != ref.shape:  # vocabulary rows
            assert torch.count_nonzero(grad[vocab:]) == 0 and torch.count_nonzero(ref[vocab:]) == 0, key
            grad, ref = grad[:vocab], ref[:vocab]
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stage_blocks_get_the_whole_models_weights(name):
    """What a pipeline stage builds (a slice of layers, the embedding on the first and last stage, the head
    on the last), in its own order and with the default generator in another state, equals the model's."""
    whole, model, derived = _build(CONFIGS[name])
    single = ParallelState.single()
    torch.manual_seed(999)  # the default generator's state plays no part
    layer1 = TransformerLayer(model, derived, single, torch.float32, layer_index=1, init_seed=SEED)
    embedding = Embedding(model, derived, single, torch.float32, init_seed=SEED)
    expected = whole.state_dict()
    for prefix, block in (("layers.1.", layer1), ("embedding.", embedding)):
        for key, tensor in block.state_dict().items():
            assert torch.equal(tensor, expected[prefix + key]), prefix + key
    if model.no_weight_tying:
        head = build_output_layer(model, derived, single, torch.float32, init_seed=SEED)
        assert torch.equal(head.weight, expected["output_layer.weight"])
    other, _, _ = _build(CONFIGS[name], seed=SEED + 1)
    assert not torch.equal(other.state_dict()["layers.1.attention.linear_qkv.weight"],
                           expected["layers.1.attention.linear_qkv.weight"])


def test_default_seed_is_the_default_generators():
    model, derived = make_args()
    torch.manual_seed(77)
    implicit = GPTModel(model, derived, ParallelState.single()).state_dict()
    explicit = GPTModel(model, derived, ParallelState.single(), init_seed=77).state_dict()
    assert all(torch.equal(implicit[k], explicit[k]) for k in explicit)
    with pytest.raises(ValueError, match="layer_index 2 must be in"):
        TransformerLayer(model, derived, ParallelState.single(), torch.float32, layer_index=2)
