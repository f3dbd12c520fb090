"""Reading a checkpoint written by EleutherAI's GPT-NeoX into our (TP=1) state dict.

Upstream's DeepSpeed checkpoints come in two layouts, both read here:
- pipeline model (pipe_parallel_size >= 1, upstream's default): `<tag>/layer_XX-model_YY-model_states.pt`,
  one file per pipeline layer XX and tensor rank YY, each holding that layer's state dict;
- sequential model (pipe_parallel_size 0): `<tag>/mp_rank_YY_model_states.pt` holding `{"module": ...}`
  with keys `sequential.XX.<layer key>`.
Layers are recognized by their keys (an index only orders them):

    embedding     word_embeddings.weight [V/tp, h] (vocab rows split), position_embeddings.weight [P, h]
    transformer   input_layernorm.{weight,bias | scale}, attention.query_key_value.{weight,bias},
                  attention.dense.{weight,bias}, post_attention_layernorm.*, mlp.linear1.*, mlp.linear2.*
    final norm    norm.{weight,bias | scale}                         (RMSNorm's weight is called `scale`)
    output        final_linear.weight [V/tp, h]                      (only with no_weight_tying)

Tensor-parallel layout of a rank r (p ranks, np = heads/p, kvp = kv heads/p, hn = head size):
- query_key_value rows: multi-head: `[np, 3, hn]` (q, k, v of each head in turn); grouped-query:
  `[np*hn | kvp*hn | kvp*hn]` (all local queries, then keys, then values). Ours groups per kv head:
  `[q heads of group g, k_g, v_g]` for each g (megatron/model/attention.py).
- mlp.linear1 rows: gated (swiglu) `[up_r | gate_r]` (upstream's Gated_Activation: x, gate = chunk(2);
  act(gate) * x), so the full up/gate weights are the concatenations of the ranks' halves; else `[w/p]`.
- dense and linear2 are row-parallel (columns split), their biases replicated; norms replicated.
"""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict
from typing import Dict, List

import torch

StateDict = Dict[str, torch.Tensor]

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
_RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


class UpstreamCheckpointError(ValueError):
    """An upstream checkpoint directory that cannot be read; the message names the file and what to do."""


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged or foreign file
        raise UpstreamCheckpointError(f"{path} could not be read as a PyTorch file: {err}") from err


def read_upstream_layers(tag_dir: str) -> List[List[StateDict]]:
    """[tp rank][layer, in pipeline order] -> that layer's state dict, from either layout."""
    per_rank: Dict[int, Dict[int, StateDict]] = defaultdict(dict)
    layer_files = [p for p in glob.glob(os.path.join(tag_dir, "layer_*-model_*-model_states.pt"))
                   if _LAYER_FILE.search(p)]
    if layer_files:
        for path in layer_files:
            layer, rank = map(int, _LAYER_FILE.search(path).groups())
            per_rank[rank][layer] = _load(path)
    else:
        rank_files = [p for p in glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")) if _RANK_FILE.search(p)]
        if not rank_files:
            raise UpstreamCheckpointError(
                f"{tag_dir} holds neither layer_XX-model_YY-model_states.pt nor mp_rank_YY_model_states.pt files: "
                f"it is not a GPT-NeoX checkpoint tag directory (give the directory holding `latest`, or --tag).")
        for path in rank_files:
            rank = int(_RANK_FILE.search(path).group(1))
            module = _load(path).get("module")
            if not isinstance(module, dict):
                raise UpstreamCheckpointError(f"{path} has no `module` state dict.")
            for key, tensor in module.items():
                match = re.match(r"(?:module\.)?sequential\.(\d+)\.(.+)$", key)
                if match is None:
                    raise UpstreamCheckpointError(f"{path}: key {key!r} is not `sequential.N.<name>` as GPT-NeoX's "
                                                  f"sequential model writes.")
                per_rank[rank].setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    ranks = sorted(per_rank)
    if ranks != list(range(len(ranks))):
        raise UpstreamCheckpointError(f"{tag_dir}: tensor-parallel ranks {ranks} found; files of ranks "
                                      f"{sorted(set(range(max(ranks) + 1)) - set(ranks))} are missing.")
    return [[per_rank[r][i] for i in sorted(per_rank[r])] for r in ranks]


def _norm(layer: StateDict, prefix: str, ours: str, out: StateDict) -> None:
    weight = layer.get(f"{prefix}.weight", layer.get(f"{prefix}.scale"))
    if weight is None:
        raise UpstreamCheckpointError(f"no {prefix}.weight (or .scale) in a GPT-NeoX layer")
    out[f"{ours}.weight"] = weight
    if f"{prefix}.bias" in layer:
        out[f"{ours}.bias"] = layer[f"{prefix}.bias"]


def _qkv(tensors: List[torch.Tensor], heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Upstream's per-rank QKV rows (weight [rows, h] or bias [rows]) -> our grouped rows, full."""
    p = len(tensors)
    np_, kvp = heads // p, kv_heads // p
    qs, ks, vs = [], [], []
    for t in tensors:
        tail = t.shape[1:]
        if kv_heads == heads:  # [np, 3, hn, ...]
            t = t.reshape(np_, 3, head_dim, *tail)
            qs.append(t[:, 0]), ks.append(t[:, 1]), vs.append(t[:, 2])
        else:
            q, k, v = torch.split(t, [np_ * head_dim, kvp * head_dim, kvp * head_dim], dim=0)
            qs.append(q.reshape(np_, head_dim, *tail))
            ks.append(k.reshape(kvp, head_dim, *tail))
            vs.append(v.reshape(kvp, head_dim, *tail))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)  # [heads | kv | kv, hn, ...]
    group = heads // kv_heads
    rows = [torch.cat([q[g * group:(g + 1) * group], k[g:g + 1], v[g:g + 1]]) for g in range(kv_heads)]
    full = torch.cat(rows)  # [kv * (group + 2), hn, ...]
    return full.reshape(-1, *full.shape[2:]).contiguous()


def upstream_to_ours(ranks: List[List[StateDict]], *, num_attention_heads: int, num_kv_heads: int,
                     gated: bool) -> StateDict:
    """Our TP=1 state dict from upstream's layers of every tensor rank (read_upstream_layers)."""
    first = ranks[0]
    layers = [i for i, layer in enumerate(first) if "attention.query_key_value.weight" in layer]
    embedding = [i for i, layer in enumerate(first) if "word_embeddings.weight" in layer]
    norms = [i for i, layer in enumerate(first) if any(k in layer for k in ("norm.weight", "norm.scale"))]
    outputs = [i for i, layer in enumerate(first) if "final_linear.weight" in layer]
    if len(embedding) != 1 or len(norms) != 1 or len(outputs) > 1 or not layers:
        raise UpstreamCheckpointError("the checkpoint does not have GPT-NeoX's layer structure (one embedding, "
                                      "transformer layers, one final norm, optionally one final_linear); other "
                                      "architectures (Mamba, RWKV, gMLP, MoE) cannot be imported.")
    out: StateDict = {}
    emb = [r[embedding[0]] for r in ranks]
    out["embedding.word_embeddings.weight"] = torch.cat([e["word_embeddings.weight"] for e in emb])
    if "position_embeddings.weight" in emb[0]:
        out["embedding.position_embeddings.weight"] = emb[0]["position_embeddings.weight"]
    hidden = out["embedding.word_embeddings.weight"].shape[1]
    head_dim = hidden // num_attention_heads
    for ours_index, upstream_index in enumerate(layers):
        per_rank = [r[upstream_index] for r in ranks]
        layer0, prefix = per_rank[0], f"layers.{ours_index}"
        _norm(layer0, "input_layernorm", f"{prefix}.input_norm", out)
        _norm(layer0, "post_attention_layernorm", f"{prefix}.post_attention_norm", out)
        for kind in ("weight", "bias"):
            key = f"attention.query_key_value.{kind}"
            if key in layer0:
                out[f"{prefix}.attention.linear_qkv.{kind}"] = _qkv([t[key] for t in per_rank], num_attention_heads,
                                                                   num_kv_heads, head_dim)
            if f"mlp.linear1.{kind}" in layer0:
                halves = [t[f"mlp.linear1.{kind}"].chunk(2, dim=0) if gated else (t[f"mlp.linear1.{kind}"],)
                          for t in per_rank]
                out[f"{prefix}.mlp.linear_fc1.{kind}"] = torch.cat([h[0] for h in halves])
                if gated:
                    out[f"{prefix}.mlp.linear_gate.{kind}"] = torch.cat([h[1] for h in halves])
        out[f"{prefix}.attention.linear_proj.weight"] = torch.cat([t["attention.dense.weight"] for t in per_rank], 1)
        out[f"{prefix}.mlp.linear_fc2.weight"] = torch.cat([t["mlp.linear2.weight"] for t in per_rank], 1)
        for up, ours in (("attention.dense.bias", "attention.linear_proj.bias"), ("mlp.linear2.bias", "mlp.linear_fc2.bias")):
            if up in layer0:
                out[f"{prefix}.{ours}"] = layer0[up]
    _norm(first[norms[0]], "norm", "final_norm", out)
    if outputs:
        out["output_layer.weight"] = torch.cat([r[outputs[0]]["final_linear.weight"] for r in ranks])
    return out
