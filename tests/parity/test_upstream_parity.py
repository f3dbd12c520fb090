"""Upstream-style configs build the model GPT-NeoX builds, checked against transformers (fp32, tiny, 1e-5):
a Llama config whose `intermediate_size` is in GPT-NeoX's 3x convention (with mlp_multiple_of) gives the
HF Llama of the real width, and `bias_gelu_fusion: true` is HF's `gelu_new` (tanh GELU)."""

import pytest
import torch
import transformers

from megatron.checkpointing.hf import hf_config, to_hf
from megatron.model import GPTModel
from megatron.mpu.initialize import ParallelState
from megatron.neox_args import NeoXArgs

ATOL = 1e-5
BASE = {"data_path": "data/bundled/pystdlib_text_document", "tokenizer_type": "ByteLevelTokenizer",
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-4}},
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 32, "pos_emb": "rotary", "no_weight_tying": True,
        "attention_config": [[["flash"], 2]], "scaled_upper_triang_masked_softmax_fusion": True,
        "make_vocab_size_divisible_by": 64}


def _ours(fields):
    args = NeoXArgs.from_dict({**BASE, **fields}, world_size=1)
    args.set_vocab_size(257)
    torch.manual_seed(0)
    model = GPTModel(args.model, args.derived, ParallelState.single()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # every weight random (biases, norms too)
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return args, model


def _hf_logits(args, model, tokens):
    cfg = hf_config(args.model, args.derived)
    cfg._attn_implementation = "eager"
    cls = transformers.GPTNeoXForCausalLM if cfg.model_type == "gpt_neox" else transformers.LlamaForCausalLM
    hf = cls(cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), args.model, args.derived), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    with torch.no_grad():
        return hf(tokens).logits, cfg


def test_llama_intermediate_size_in_upstreams_convention_matches_hf_llama():
    # int(256 * 2/3) = 170 -> 192 (multiple of 2 x 32); 170 // 2 = 85 -> 96 (multiple of 32)
    args, model = _ours({"norm": "rmsnorm", "rms_norm_epsilon": 1e-5, "activation": "swiglu",
                         "intermediate_size": 256, "mlp_multiple_of": 32, "use_bias_in_norms": False,
                         "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "num_kv_heads": 2})
    assert args.derived.intermediate_size == 96
    assert model.state_dict()["layers.0.mlp.linear_fc1.weight"].shape == (96, 64)
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(2))
    hf, cfg = _hf_logits(args, model, tokens)
    assert cfg.intermediate_size == 96
    with torch.no_grad():
        ours = model(tokens)[..., :257]  # the padding columns are -inf; HF holds the real vocabulary
    assert (hf - ours).abs().max().item() <= ATOL


def test_bias_gelu_fusion_is_hf_gelu_new():
    args, model = _ours({"bias_gelu_fusion": True, "gpt_j_residual": True, "rotary_pct": 0.25})
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(2))
    hf, cfg = _hf_logits(args, model, tokens)
    assert cfg.hidden_act == "gelu_new"
    with torch.no_grad():
        ours = model(tokens)[..., :257]  # the padding columns are -inf; HF holds the real vocabulary
        assert (hf - ours).abs().max().item() <= ATOL
        model.layers[0].mlp.gelu_approximate = "none"  # the exact GELU is measurably different
        assert (hf - model(tokens)[..., :257]).abs().max().item() > 100 * ATOL
