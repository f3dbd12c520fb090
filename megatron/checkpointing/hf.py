"""Declarative key maps between our GPTModel state dict and Hugging Face transformers models.

Two families:
  - "gpt_neox": transformers `GPTNeoXForCausalLM` (LayerNorm, gelu/relu MLP, rotary, parallel or
    sequential residual, multi-head attention only);
  - "llama": transformers `LlamaForCausalLM` (RMSNorm, SwiGLU, full rotary, sequential residual, GQA).

Each table row is one `KeyRule`: our key pattern(s), HF key pattern(s) (`{i}` is the layer index) and a
pair of transforms (ours -> HF, HF -> ours) acting on the lists of tensors. A rule whose source keys are
all absent is skipped (biases, untied heads), so one table serves every bias/tying option.

Vocabulary: our embedding (and untied output head) has `padded_vocab_size` rows, of which the first
`vocab_size` are the tokenizer's; the padding rows take no probability in our softmax (megatron/mpu/
cross_entropy.py). `to_hf` therefore keeps only the `vocab_size` real rows and the HF config's `vocab_size`
is the real vocabulary: the HF model computes exactly our trained function (a padding row exported as a
logit of 0 would take probability). `from_hf` accepts at most `padded_vocab_size` rows and pads missing
rows with zeros (every HF row is a real id: an HF checkpoint's own padding rows stay in its softmax).

QKV: our fused `linear_qkv` rows are grouped per key/value group, [q heads of group g, k_g, v_g]
(see megatron/model/attention.py). With multi-head attention that is exactly HF GPT-NeoX's per-head
[q_h, k_h, v_h] interleave (identity); Llama's separate q/k/v projections are split/concatenated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from megatron.neox_args.sections import DerivedArgs, ModelArgs

Tensors = List[torch.Tensor]


@dataclass(frozen=True)
class Shapes:
    """What the transforms need to know about the model."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    padded_vocab_size: int
    vocab_size: int  # the real rows (<= padded_vocab_size)


Transform = Callable[[Tensors, Shapes], Tensors]


@dataclass(frozen=True)
class KeyRule:
    ours: Tuple[str, ...]
    hf: Tuple[str, ...]
    to_hf: Transform
    from_hf: Transform


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

def identity(ts: Tensors, shapes: Shapes) -> Tensors:
    return list(ts)


def pad_vocab_rows(ts: Tensors, shapes: Shapes) -> Tensors:
    """HF [V, h] -> ours [padded_V, h]: zero rows appended (V <= padded_V)."""
    (w,) = ts
    rows, padded = w.shape[0], shapes.padded_vocab_size
    if rows > padded:
        raise ValueError(
            f"the HF checkpoint has {rows} vocabulary rows but the model's padded_vocab_size is {padded}: "
            f"set make_vocab_size_divisible_by so that the padded vocabulary is at least {rows}"
        )
    if rows == padded:
        return [w]
    return [torch.cat([w, w.new_zeros(padded - rows, *w.shape[1:])], dim=0)]


def unpad_vocab_rows(ts: Tensors, shapes: Shapes) -> Tensors:
    """ours [padded_V, h] -> HF [V, h]: the real vocabulary rows only."""
    (w,) = ts
    return [w[: shapes.vocab_size]]


def grouped_qkv_to_separate(ts: Tensors, shapes: Shapes) -> Tensors:
    """ours [(nq + 2 nkv) d, ...] grouped [q.., k_g, v_g] per kv group -> q [nq d, ...], k, v [nkv d, ...]."""
    (w,) = ts
    r = shapes.num_heads // shapes.num_kv_heads
    grouped = w.reshape(shapes.num_kv_heads, r + 2, shapes.head_dim, *w.shape[1:])
    q = grouped[:, :r].reshape(shapes.num_heads * shapes.head_dim, *w.shape[1:])
    k = grouped[:, r].reshape(shapes.num_kv_heads * shapes.head_dim, *w.shape[1:])
    v = grouped[:, r + 1].reshape(shapes.num_kv_heads * shapes.head_dim, *w.shape[1:])
    return [q, k, v]


def separate_qkv_to_grouped(ts: Tensors, shapes: Shapes) -> Tensors:
    """Inverse of `grouped_qkv_to_separate`."""
    q, k, v = ts
    nkv, d, rest = shapes.num_kv_heads, shapes.head_dim, q.shape[1:]
    r = shapes.num_heads // nkv
    grouped = torch.cat(
        [q.reshape(nkv, r, d, *rest), k.reshape(nkv, 1, d, *rest), v.reshape(nkv, 1, d, *rest)], dim=1
    )  # [nkv, r + 2, d, ...]
    return [grouped.reshape((shapes.num_heads + 2 * nkv) * d, *rest)]


def _rule(ours, hf, to_hf: Transform = identity, from_hf: Transform = identity) -> KeyRule:
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)  # noqa: E731
    return KeyRule(as_tuple(ours), as_tuple(hf), to_hf, from_hf)


def _weight_and_bias(ours: str, hf: str) -> List[KeyRule]:
    return [_rule(f"{ours}.weight", f"{hf}.weight"), _rule(f"{ours}.bias", f"{hf}.bias")]


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------

GPT_NEOX_RULES: List[KeyRule] = [
    _rule("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight", unpad_vocab_rows, pad_vocab_rows),
    *_weight_and_bias("layers.{i}.input_norm", "gpt_neox.layers.{i}.input_layernorm"),
    # grouped [q_h, k_h, v_h] with one query head per group == HF's per-head interleave
    *_weight_and_bias("layers.{i}.attention.linear_qkv", "gpt_neox.layers.{i}.attention.query_key_value"),
    *_weight_and_bias("layers.{i}.attention.linear_proj", "gpt_neox.layers.{i}.attention.dense"),
    *_weight_and_bias("layers.{i}.post_attention_norm", "gpt_neox.layers.{i}.post_attention_layernorm"),
    *_weight_and_bias("layers.{i}.mlp.linear_fc1", "gpt_neox.layers.{i}.mlp.dense_h_to_4h"),
    *_weight_and_bias("layers.{i}.mlp.linear_fc2", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"),
    *_weight_and_bias("final_norm", "gpt_neox.final_layer_norm"),
    _rule("output_layer.weight", "lm_head.weight", unpad_vocab_rows, pad_vocab_rows),
]

LLAMA_RULES: List[KeyRule] = [
    _rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", unpad_vocab_rows, pad_vocab_rows),
    _rule("layers.{i}.input_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    *[
        _rule(f"layers.{{i}}.attention.linear_qkv.{p}",
              [f"model.layers.{{i}}.self_attn.{n}_proj.{p}" for n in "qkv"],
              grouped_qkv_to_separate, separate_qkv_to_grouped)
        for p in ("weight", "bias")
    ],
    *_weight_and_bias("layers.{i}.attention.linear_proj", "model.layers.{i}.self_attn.o_proj"),
    _rule("layers.{i}.post_attention_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *_weight_and_bias("layers.{i}.mlp.linear_gate", "model.layers.{i}.mlp.gate_proj"),
    *_weight_and_bias("layers.{i}.mlp.linear_fc1", "model.layers.{i}.mlp.up_proj"),
    *_weight_and_bias("layers.{i}.mlp.linear_fc2", "model.layers.{i}.mlp.down_proj"),
    _rule("final_norm.weight", "model.norm.weight"),
    _rule("output_layer.weight", "lm_head.weight", unpad_vocab_rows, pad_vocab_rows),
]

FAMILIES: Dict[str, List[KeyRule]] = {"gpt_neox": GPT_NEOX_RULES, "llama": LLAMA_RULES}
EMBEDDING_KEYS = {"gpt_neox": "gpt_neox.embed_in.weight", "llama": "model.embed_tokens.weight"}
HF_ALIASES = {"embed_out.weight": "lm_head.weight"}  # GPT-NeoX checkpoints saved by transformers < 5
HF_IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------
# Family selection and validation
# ---------------------------------------------------------------------------------------------

def hf_family(model: ModelArgs) -> str:
    """"llama" for RMSNorm/SwiGLU models, "gpt_neox" otherwise; raises if HF cannot express the model."""
    family = "llama" if (model.norm == "rmsnorm" or model.activation == "swiglu") else "gpt_neox"
    problems = []
    if model.pos_emb != "rotary":
        problems.append(f"pos_emb must be rotary (got {model.pos_emb})")
    if family == "llama":
        for field, want in [("norm", "rmsnorm"), ("activation", "swiglu"), ("rotary_pct", 1.0),
                            ("gpt_j_residual", False)]:
            if getattr(model, field) != want:
                problems.append(f"{field} must be {want!r} (got {getattr(model, field)!r})")
    else:
        if model.activation not in ("gelu", "relu"):
            problems.append(f"activation must be gelu or relu (got {model.activation})")
        if not model.use_bias_in_norms:
            problems.append("use_bias_in_norms must be true (HF GPT-NeoX LayerNorms have biases)")
        if not model.use_bias_in_mlp:
            problems.append("use_bias_in_mlp must be true (HF GPT-NeoX MLPs have biases)")
        if model.num_kv_heads not in (None, model.num_attention_heads):
            problems.append("num_kv_heads must equal num_attention_heads (HF GPT-NeoX has no GQA)")
    if problems:
        target = "LlamaForCausalLM" if family == "llama" else "GPTNeoXForCausalLM"
        raise ValueError(f"this model cannot be expressed as HF {target}: " + "; ".join(problems))
    return family


def _shapes(model: ModelArgs, derived: DerivedArgs) -> Shapes:
    return Shapes(
        num_heads=model.num_attention_heads,
        num_kv_heads=derived.num_kv_heads,
        head_dim=model.hidden_size // model.num_attention_heads,
        padded_vocab_size=derived.padded_vocab_size,
        vocab_size=_real_vocab(derived),
    )


def _real_vocab(derived: DerivedArgs) -> int:
    """The tokenizer's vocabulary; every padded row when it is unknown (0), as the model does."""
    from megatron.model.gpt import real_vocab_size

    return real_vocab_size(derived)


def _apply(rules: List[KeyRule], src: Dict[str, torch.Tensor], num_layers: int, shapes: Shapes,
           direction: str) -> Dict[str, torch.Tensor]:
    """Map every key of `src` through `rules` (direction "to_hf" or "from_hf"); leftovers are an error."""
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for rule in rules:
        src_pats, dst_pats = (rule.ours, rule.hf) if direction == "to_hf" else (rule.hf, rule.ours)
        transform = rule.to_hf if direction == "to_hf" else rule.from_hf
        layer_ids = range(num_layers) if "{i}" in src_pats[0] else [None]
        for i in layer_ids:
            src_keys = [p.format(i=i) for p in src_pats]
            present = [k in src for k in src_keys]
            if not any(present):
                continue
            if not all(present):
                missing = [k for k, p in zip(src_keys, present) if not p]
                raise KeyError(f"incomplete checkpoint: {missing} missing next to {src_keys}")
            results = transform([src[k] for k in src_keys], shapes)
            for key, tensor in zip((p.format(i=i) for p in dst_pats), results):
                out[key] = tensor.contiguous().clone()
            used.update(src_keys)
    leftover = sorted(set(src) - used)
    if leftover:
        raise KeyError(f"{direction}: keys with no mapping (wrong family or num_layers?): {leftover[:8]}")
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def to_hf(state_dict: Dict[str, torch.Tensor], model: ModelArgs, derived: DerivedArgs) -> Dict[str, torch.Tensor]:
    """Our GPTModel state dict (TP=1) -> the HF model's state dict (tied: lm_head = embedding)."""
    family = hf_family(model)
    out = _apply(FAMILIES[family], dict(state_dict), model.num_layers, _shapes(model, derived), "to_hf")
    if not model.no_weight_tying:
        out["lm_head.weight"] = out[EMBEDDING_KEYS[family]]
    return out


def from_hf(hf_state_dict: Dict[str, torch.Tensor], model: ModelArgs, derived: DerivedArgs) -> Dict[str, torch.Tensor]:
    """An HF model's state dict -> our GPTModel state dict (TP=1), for `GPTModel.load_state_dict`."""
    family = hf_family(model)
    src = {HF_ALIASES.get(k, k): v for k, v in hf_state_dict.items() if not k.endswith(HF_IGNORED_SUFFIXES)}
    if not model.no_weight_tying and "lm_head.weight" in src:
        head, emb = src.pop("lm_head.weight"), src[EMBEDDING_KEYS[family]]
        if head.shape != emb.shape or not torch.equal(head, emb):
            raise ValueError("the HF checkpoint has an lm_head different from its input embedding: "
                             "set no_weight_tying: true")
    return _apply(FAMILIES[family], src, model.num_layers, _shapes(model, derived), "from_hf")


def hf_config(model: ModelArgs, derived: DerivedArgs):
    """The transformers config (GPTNeoXConfig or LlamaConfig) of our model; vocab_size = the real vocab."""
    import transformers

    family = hf_family(model)
    common = dict(
        vocab_size=_real_vocab(derived),
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=derived.intermediate_size,
        max_position_embeddings=derived.max_position_embeddings,
        tie_word_embeddings=not model.no_weight_tying,
        attention_bias=model.use_bias_in_attn_linear,
        attention_dropout=model.attention_dropout,
        initializer_range=model.init_method_std,
    )
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            **common,
            hidden_act="gelu_new" if (model.activation == "gelu" and model.bias_gelu_fusion) else model.activation,
            hidden_dropout=model.hidden_dropout,
            layer_norm_eps=model.layernorm_epsilon,
            use_parallel_residual=model.gpt_j_residual,
            rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_emb_base),
                             "partial_rotary_factor": model.rotary_pct},
            architectures=["GPTNeoXForCausalLM"],
        )
    return transformers.LlamaConfig(
        **common,
        num_key_value_heads=derived.num_kv_heads,
        hidden_act="silu",
        rms_norm_eps=model.rms_norm_epsilon,
        mlp_bias=model.use_bias_in_mlp,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_emb_base)},
        architectures=["LlamaForCausalLM"],
    )


def _vocab_divisor(vocab_size: int) -> int:
    """The largest power of two <= 128 dividing vocab_size, so that TP=1 padding keeps the HF row count."""
    return math.gcd(vocab_size, 128)


def _rope(cfg) -> Tuple[float, float]:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} (rope scaling) is not supported; only 'default'")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", getattr(cfg, "rotary_emb_base", 10000)))
    pct = rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0))
    return theta, pct


def model_args_from_hf_config(cfg) -> dict:
    """ModelArgs fields (a dict, YAML-ready) for an HF GPTNeoXConfig or LlamaConfig."""
    theta, pct = _rope(cfg)
    theta = int(theta) if float(theta).is_integer() else theta
    args = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        # GPT-NeoX's key counts a gated (SwiGLU) width 3x: 3w with mlp_multiple_of 1 resolves to w exactly
        intermediate_size=cfg.intermediate_size * (3 if cfg.model_type == "llama" else 1),
        mlp_multiple_of=1,
        seq_length=cfg.max_position_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        pos_emb="rotary",
        rotary_emb_base=theta,
        no_weight_tying=not cfg.tie_word_embeddings,
        use_bias_in_attn_linear=bool(cfg.attention_bias),
        attention_dropout=float(cfg.attention_dropout),
        make_vocab_size_divisible_by=_vocab_divisor(cfg.vocab_size),
    )
    if cfg.model_type == "gpt_neox":
        if cfg.hidden_act not in ("gelu", "relu", "gelu_new"):
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported: gelu (exact), gelu_new (tanh) or "
                             f"relu")
        args.update(bias_gelu_fusion=cfg.hidden_act == "gelu_new")
        args.update(
            rotary_pct=pct, gpt_j_residual=bool(cfg.use_parallel_residual), norm="layernorm",
            layernorm_epsilon=cfg.layer_norm_eps, use_bias_in_norms=True, use_bias_in_mlp=True,
            activation="gelu" if cfg.hidden_act == "gelu_new" else cfg.hidden_act,
            hidden_dropout=float(cfg.hidden_dropout),
        )
    elif cfg.model_type == "llama":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim * cfg.num_attention_heads != cfg.hidden_size:
            raise ValueError(f"head_dim {head_dim} * heads {cfg.num_attention_heads} != hidden_size "
                             f"{cfg.hidden_size}: not supported")
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported for Llama: silu (SwiGLU)")
        args.update(
            num_kv_heads=cfg.num_key_value_heads, rotary_pct=1.0, gpt_j_residual=False, norm="rmsnorm",
            rms_norm_epsilon=cfg.rms_norm_eps, activation="swiglu", use_bias_in_mlp=bool(cfg.mlp_bias),
            hidden_dropout=0.0,
        )
    else:
        raise ValueError(f"HF model_type {cfg.model_type!r} is not supported: gpt_neox or llama")
    return args


def derived_args_from_hf_config(cfg) -> DerivedArgs:
    """The DerivedArgs fields the model needs (TP=1), resolved from an HF config."""
    return DerivedArgs(
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.vocab_size,
    )
