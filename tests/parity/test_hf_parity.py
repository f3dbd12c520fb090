"""Our GPTModel against transformers' GPTNeoXForCausalLM and LlamaForCausalLM on tiny random models.

HF weights go through `from_hf` into our model; logits on random tokens must agree to 1e-5 (fp32,
eval mode). `to_hf` is checked the other way round (our random model -> HF), and ours -> HF -> ours must
be bit-exact.
"""

import pytest
import torch
import transformers

from megatron.checkpointing.hf import (
    derived_args_from_hf_config,
    from_hf,
    hf_config,
    model_args_from_hf_config,
    to_hf,
)
from megatron.model import GPTModel
from megatron.mpu.initialize import ParallelState
from megatron.neox_args.sections import ModelArgs

ATOL = 1e-5
VOCAB = 128


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases and norm weights too), so that no mapping hides behind 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise * 2.0)


def _neox_config(rotary_pct=0.25, parallel_residual=True, tied=False, vocab=VOCAB, act="gelu", attn_bias=True):
    return transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        hidden_act=act, max_position_embeddings=64, layer_norm_eps=1e-5, use_parallel_residual=parallel_residual,
        tie_word_embeddings=tied, attention_bias=attn_bias,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_pct},
        attn_implementation="eager",
    )


def _llama_config(tied=False, attn_bias=False, mlp_bias=False, vocab=VOCAB):
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        attention_bias=attn_bias, mlp_bias=mlp_bias,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, attn_implementation="sdpa",
    )


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    cls = transformers.GPTNeoXForCausalLM if cfg.model_type == "gpt_neox" else transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    _randomize(model, seed)
    return model


def _ours_from_hf(hf_model, padded_vocab=None):
    cfg = hf_model.config
    model_args = ModelArgs(**model_args_from_hf_config(cfg))
    derived = derived_args_from_hf_config(cfg)
    if padded_vocab is not None:
        derived.padded_vocab_size = padded_vocab
    ours = GPTModel(model_args, derived, ParallelState.single()).eval()
    ours.load_state_dict(from_hf(hf_model.state_dict(), model_args, derived), strict=True)
    return ours, model_args, derived


def _tokens(b=2, s=24, vocab=VOCAB, seed=1):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _assert_same_logits(ours, hf_model, vocab):
    tokens = _tokens(vocab=vocab)
    with torch.no_grad():
        expected = hf_model(tokens).logits  # [b, s, vocab]
        got = ours(tokens)[..., :vocab]  # [b, s, padded_vocab] -> real rows
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"max |logits diff| = {diff}"
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_gpt_neox_logits_match(rotary_pct, parallel_residual):
    hf_model = _hf_model(_neox_config(rotary_pct, parallel_residual))
    ours, _, _ = _ours_from_hf(hf_model)
    _assert_same_logits(ours, hf_model, VOCAB)


def test_gpt_neox_tied_relu_nobias_attention():
    hf_model = _hf_model(_neox_config(tied=True, act="relu", attn_bias=False))
    assert hf_model.lm_head.weight is hf_model.gpt_neox.embed_in.weight
    ours, model_args, _ = _ours_from_hf(hf_model)
    assert not model_args.no_weight_tying and ours.output_layer is None
    _assert_same_logits(ours, hf_model, VOCAB)


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_llama_gqa_logits_match(tied, bias):
    hf_model = _hf_model(_llama_config(tied=tied, attn_bias=bias, mlp_bias=bias))
    ours, model_args, derived = _ours_from_hf(hf_model)
    assert derived.num_kv_heads == 2 and model_args.rotary_emb_base == 500000
    _assert_same_logits(ours, hf_model, VOCAB)


def test_padded_vocab_rows_are_zero_filled():
    hf_model = _hf_model(_neox_config(vocab=100))
    ours, _, _ = _ours_from_hf(hf_model, padded_vocab=128)
    assert ours.embedding.word_embeddings.weight.shape[0] == 128
    assert torch.count_nonzero(ours.embedding.word_embeddings.weight[100:]) == 0
    _assert_same_logits(ours, hf_model, 100)


def test_too_many_hf_rows_is_a_clear_error():
    hf_model = _hf_model(_neox_config(vocab=130))
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by"):
        _ours_from_hf(hf_model, padded_vocab=128)


NEOX_OURS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, seq_length=32,
                 rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, pos_emb="rotary")
LLAMA_OURS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, intermediate_size=96,
                  seq_length=32, norm="rmsnorm", activation="swiglu", rotary_emb_base=500000,
                  use_bias_in_attn_linear=False, use_bias_in_mlp=False, no_weight_tying=True, pos_emb="rotary")


def _ours(fields, seed=3):
    from megatron.neox_args.sections import DerivedArgs

    model_args = ModelArgs(**fields)
    derived = DerivedArgs(num_kv_heads=model_args.num_kv_heads or model_args.num_attention_heads,
                          intermediate_size=model_args.intermediate_size, max_position_embeddings=64,
                          vocab_size=VOCAB, padded_vocab_size=VOCAB)
    torch.manual_seed(seed)
    ours = GPTModel(model_args, derived, ParallelState.single()).eval()
    _randomize(ours, seed)
    return ours, model_args, derived


@pytest.mark.parametrize("fields", [NEOX_OURS, {**NEOX_OURS, "no_weight_tying": False}, LLAMA_OURS,
                                    {**LLAMA_OURS, "no_weight_tying": False, "use_bias_in_attn_linear": True}],
                         ids=["neox", "neox-tied", "llama", "llama-tied-bias"])
def test_round_trip_and_to_hf_logits(fields):
    ours, model_args, derived = _ours(fields)
    state = ours.state_dict()
    hf_state = to_hf(state, model_args, derived)
    back = from_hf(hf_state, model_args, derived)
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key

    cfg = hf_config(model_args, derived)
    cfg._attn_implementation = "eager"
    cls = transformers.GPTNeoXForCausalLM if cfg.model_type == "gpt_neox" else transformers.LlamaForCausalLM
    hf_model = cls(cfg).eval()
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    _assert_same_logits(ours, hf_model, VOCAB)

    # the config survives HF -> ours
    again = model_args_from_hf_config(cfg)
    for key, value in again.items():
        if key in fields and key not in ("seq_length", "intermediate_size"):  # seq_length: a training choice
            assert value == fields[key], key
    # intermediate_size comes back in GPT-NeoX's convention (3x for SwiGLU) and resolves to the same width
    from megatron.neox_args.derive import resolve_intermediate_size

    assert resolve_intermediate_size(ModelArgs(**again)) == derived.intermediate_size


def test_unsupported_model_is_a_clear_error():
    ours, model_args, derived = _ours({**NEOX_OURS, "pos_emb": "learned"})
    with pytest.raises(ValueError, match="pos_emb must be rotary"):
        to_hf(ours.state_dict(), model_args, derived)


@pytest.mark.parametrize("fields", [NEOX_OURS, {**LLAMA_OURS, "no_weight_tying": False}], ids=["neox", "llama-tied"])
def test_export_of_a_padded_vocabulary_is_the_trained_function(fields):
    """100 real ids padded to 128 rows (even the padding rows random here): the HF model has the 100 real
    rows and computes our distribution exactly (log-probabilities and loss, 1e-5); back in ours the real
    rows are bit-exact and the padding rows zero."""
    from megatron.neox_args.sections import DerivedArgs

    real = 100
    model_args = ModelArgs(**fields)
    derived = DerivedArgs(num_kv_heads=model_args.num_kv_heads or model_args.num_attention_heads,
                          intermediate_size=model_args.intermediate_size, max_position_embeddings=64,
                          vocab_size=real, padded_vocab_size=VOCAB)
    ours = GPTModel(model_args, derived, ParallelState.single(), init_seed=5).eval()
    _randomize(ours, 5)
    hf_state = to_hf(ours.state_dict(), model_args, derived)
    cfg = hf_config(model_args, derived)
    assert cfg.vocab_size == real and hf_state["lm_head.weight"].shape[0] == real
    cfg._attn_implementation = "eager"
    cls = transformers.GPTNeoXForCausalLM if cfg.model_type == "gpt_neox" else transformers.LlamaForCausalLM
    hf_model = cls(cfg).eval()
    hf_model.load_state_dict(hf_state, strict=False)
    hf_model.tie_weights()

    tokens = _tokens(vocab=real)
    labels = _tokens(vocab=real, seed=2)
    with torch.no_grad():
        ours_logp = torch.log_softmax(ours(tokens), dim=-1)  # [b, s, 128], -inf on the padding
        hf_out = hf_model(tokens)
        ours_loss = ours(tokens, labels, torch.ones_like(labels, dtype=torch.float32))
    assert torch.isneginf(ours_logp[..., real:]).all()
    torch.testing.assert_close(torch.log_softmax(hf_out.logits, dim=-1), ours_logp[..., :real], atol=ATOL, rtol=0)
    hf_loss = torch.nn.functional.cross_entropy(hf_out.logits.reshape(-1, real), labels.reshape(-1))
    torch.testing.assert_close(hf_loss, ours_loss, atol=ATOL, rtol=0)

    back = from_hf(hf_state, model_args, derived)
    for key, tensor in ours.state_dict().items():
        if tensor.shape[0] == VOCAB and ("word_embeddings" in key or key.startswith("output_layer")):
            assert torch.equal(back[key][:real], tensor[:real]) and torch.count_nonzero(back[key][real:]) == 0
        else:
            assert torch.equal(back[key], tensor), key
