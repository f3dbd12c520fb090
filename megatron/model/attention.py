"""Causal self-attention with tensor-parallel heads, grouped-query attention and rotary embeddings.

QKV layout. One fused column-parallel projection produces, for each of the `num_kv_heads` key/value
groups g, the columns `[q heads of group g (q_per_kv of them), k_g, v_g]`, each `head_dim` wide:

    linear_qkv.weight rows = [ q_0 .. q_{r-1}, k_0, v_0 | q_r .. q_{2r-1}, k_1, v_1 | ... ]   r = q_per_kv

A contiguous tensor-parallel shard of the rows therefore holds `num_kv_heads/tp` whole groups, i.e.
`num_attention_heads/tp` query heads with their own keys and values. With plain multi-head attention
(r = 1) this is exactly HF GPT-NeoX's `query_key_value` layout ([q_h, k_h, v_h] per head).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from megatron.model.attention_kernels import causal_attention, sdpa_causal
from megatron.model.attention_support import check_attention_support
from megatron.model.init import WeightInit, resolve_init_seed
from megatron.model.positional import RotaryEmbedding, apply_rotary
from megatron.mpu.initialize import ParallelState
from megatron.mpu.layers import ColumnParallelLinear, RowParallelLinear
from megatron.mpu.random import checkpoint, get_rng_tracker
from megatron.neox_args.sections import DerivedArgs, ModelArgs

def sdpa_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, backend: str | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v through torch SDPA, without materializing a mask.

    q `[b, nq, s, d]`, k and v `[b, nkv, s, d]` with nkv dividing nq (grouped-query attention).
    Returns `[b, nq, s, d]`. `backend` forces one SDPA kernel. (The layer itself calls
    `attention_kernels.causal_attention` in the `[s, b, heads, d]` layout.)
    """
    q, k, v = (t.permute(2, 0, 1, 3) for t in (q, k, v))  # [s, b, heads, d] views
    return sdpa_causal(q, k, v, dropout_p, backend).permute(1, 2, 0, 3)


class ParallelSelfAttention(nn.Module):
    """x `[s, b, h]` (or `[s/tp, b, h]` under sequence parallelism) -> same shape.

    Each tensor rank owns `num_local_heads` query heads and `num_local_kv_heads` key/value heads.
    `init`: the block's random source (megatron/model/init.py); default: prefix "attention" under
    `torch.initial_seed()`.
    """

    def __init__(
        self,
        model: ModelArgs,
        derived: DerivedArgs,
        parallel: ParallelState,
        dtype: torch.dtype = torch.float32,
        init: WeightInit | None = None,
    ):
        super().__init__()
        tp = parallel.tp_size
        num_heads, num_kv_heads = model.num_attention_heads, derived.num_kv_heads
        if model.hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {model.hidden_size} must be divisible by num_attention_heads {num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_attention_heads {num_heads} must be divisible by num_kv_heads {num_kv_heads}")
        if num_kv_heads % tp != 0:
            raise ValueError(
                f"num_kv_heads {num_kv_heads} (and num_attention_heads {num_heads}) must be divisible by "
                f"model_parallel_size {tp}: each tensor rank holds whole key/value groups"
            )
        check_attention_support(model)  # kernel packages and features present (ConfigError otherwise)
        self.head_dim = model.hidden_size // num_heads
        self.q_per_kv = num_heads // num_kv_heads
        self.num_local_kv_heads = num_kv_heads // tp
        self.num_local_heads = num_heads // tp
        self.attention_dropout = model.attention_dropout
        self.attention_impl = model.attention_impl
        self.sdpa_backend = model.sdpa_backend
        self.window = model.sliding_window_width
        self.sequence_parallel = parallel.sequence_parallel
        self.recompute_core = False  # set by GPTModel for recompute_modules: [core_attn]
        self.rotary = (
            RotaryEmbedding(self.head_dim, model.rotary_pct, model.rotary_emb_base, derived.max_position_embeddings)
            if model.pos_emb == "rotary" else None
        )  # cos/sin tables of every position (one copy per model: positional.share_rotary_tables)

        init = init or WeightInit(resolve_init_seed(None), "attention")
        sp = parallel.sequence_parallel
        bias = model.use_bias_in_attn_linear
        self.linear_qkv = ColumnParallelLinear(
            model.hidden_size, (num_heads + 2 * num_kv_heads) * self.head_dim, tp_group=parallel.tp_group,
            bias=bias, gather_output=False, sequence_parallel=sp,
            init_method=init.fn(model.init_method, model, "linear_qkv.weight"), params_dtype=dtype,
        )
        self.linear_proj = RowParallelLinear(
            num_heads * self.head_dim, model.hidden_size, tp_group=parallel.tp_group,
            bias=bias, input_is_parallel=True, sequence_parallel=sp,
            init_method=init.fn(model.output_layer_init_method, model, "linear_proj.weight"), params_dtype=dtype,
        )

    def qkv_heads(self, x: torch.Tensor, position_ids: torch.Tensor | None = None):
        """x as in the class docstring -> (q [s, b, local_heads, d], k, v [s, b, local_kv, d]), rotated when
        the model is rotary; `position_ids` int64 `[b, s]` (full sequence; None: 0..s-1)."""
        qkv = self.linear_qkv(x)  # [s, b, local_kv * (q_per_kv + 2) * d] (full sequence)
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, self.num_local_kv_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(s, b, self.num_local_heads, self.head_dim)
        k = qkv[:, :, :, self.q_per_kv]  # [s, b, local_kv, d]
        v = qkv[:, :, :, self.q_per_kv + 1]  # [s, b, local_kv, d]
        if self.rotary is not None:
            # rotated in the [s, b, heads, d] order, so new q and k are laid out like it (and so is the
            # attention output, which cuDNN lays out like q): no copies to and from [b, heads, s, d] order
            if position_ids is None:
                cos, sin = self.rotary.cos_sin(s, q.device)  # [s, rotary_ndims]
                cos, sin = cos[:, None, None, :], sin[:, None, None, :]
            else:
                cos, sin = self.rotary.cos_sin_at(position_ids.t())  # [s, b, rotary_ndims]
                cos, sin = cos[:, :, None, :], sin[:, :, None, :]
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        return q, k, v

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + causal (and document / window) mask) v: q `[s, b, local_heads, d]`,
        k and v `[s, b, local_kv, d]` -> `[s, b, local_heads, d]`. `cu_seqlens` int32 `[n_docs + 1]` and
        `max_seqlen` (full sequence, all rows: see megatron/data/doc_masks.py) restrict attention to each
        token's document. With `recompute_core` only q, k, v are kept for backward."""
        dropout_p = self.attention_dropout if self.training else 0.0

        def core(q, k, v):
            # attention probabilities belong to the local heads (sharded): their dropout draws from the
            # tensor-rank RNG stream
            with get_rng_tracker().fork() if dropout_p > 0.0 else contextlib.nullcontext():
                return causal_attention(q, k, v, impl=self.attention_impl, sdpa_backend=self.sdpa_backend,
                                        dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                        window=self.window)  # [s, b, local_heads, d]

        if self.recompute_core and torch.is_grad_enabled():
            return checkpoint(core, q, k, v)  # only q, k, v kept; the tracker stream replayed for dropout
        return core(q, k, v)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output `[s, b, local_heads, d]` -> `[s, b, h]` (or `[s/tp, b, h]` under SP).

        A kernel that writes its output batch-major (FlashAttention-4: `[b, s, heads, d]` memory, handed
        back as an `[s, b, ...]` view) is projected in that order: the `[s, b]` reshape would copy it, and
        the projection would keep that copy for its weight gradient beside the kernel's own saved output
        (llama-1B at 8192 x 2: 64 MiB a layer). The rows of a GEMM are independent, so the result is the
        same; without SP the reduction over tensor ranks is elementwise and cares for no order either."""
        s, b = out.shape[:2]
        width = self.num_local_heads * self.head_dim
        if b > 1 and not self.sequence_parallel and out.transpose(0, 1).is_contiguous():
            batch_major = self.linear_proj(out.transpose(0, 1).reshape(b, s, width))  # [b, s, h]
            return batch_major.transpose(0, 1)  # [s, b, h] view
        return self.linear_proj(out.reshape(s, b, width))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """x as in the class docstring -> same shape: `project(core_attention(*qkv_heads(x)))`."""
        q, k, v = self.qkv_heads(x, position_ids)
        return self.project(self.core_attention(q, k, v, cu_seqlens, max_seqlen))
