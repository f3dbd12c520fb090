"""Causal attention kernels, with document-aware (variable-length) and sliding-window variants.

Every function here takes the layout the attention layer produces after rotary,

    q `[s, b, nq, d]`, k and v `[s, b, nkv, d]`  (nkv divides nq: grouped-query attention)

and returns the attention output `[s, b, nq, d]`. What they compute, for query i and key j of one row:

    out_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j   over the keys j allowed for i:
      causal:               j <= i
      documents:            j <= i and doc(j) == doc(i)       (`cu_seqlens`, megatron/data/doc_masks.py)
      sliding window w:     i - w <= j <= i                   (GPT-NeoX `sliding_window_width`: the token
                                                               itself and the w before it)

No `s x s` mask is ever built. The kernels:

- `fa4`: FlashAttention-4 (`flash_attn.cute` from the `flash-attn-4` package, CuTe DSL; Hopper and
  Blackwell): `flash_attn_func` / `flash_attn_varlen_func` with `causal=True`, `window_size=(w, 0)`.
- `flash`: the flash-attn (2.x) package: `flash_attn_func` / `flash_attn_varlen_func`, same arguments.
- `sdpa` on CUDA: torch SDPA for plain causal attention; torch's variable-length attention
  (`torch.nn.attention.varlen.varlen_attn`) for documents and windows.
- `sdpa` on CPU (and the reference of the tests): `reference_attention`, SDPA per document segment,
  and for a window, per block of queries against the keys of its window (a `block x (block + w)` mask).
  Exact in fp32; slow on a GPU (one kernel per document), never used there.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

_SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}

FA4_PACKAGE = "flash-attn-4"
"""The pip package that provides `flash_attn.cute` (attention_impl: fa4)."""


def import_fa4():
    """`flash_attn.cute` (FlashAttention-4), or None when the flash-attn-4 package is not installed."""
    try:
        import flash_attn.cute as fa4
    except ImportError:
        return None
    return fa4


def import_flash_attn():
    """The flash-attn (2.x) package's module, or None when it is not installed."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func  # noqa: F401  (FA4 alone has no top-level functions)
    except ImportError:
        return None
    return flash_attn


# --------------------------------------------------------------------------------------------------------
# plain causal (no documents, no window)

def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                backend: Optional[str] = None) -> torch.Tensor:
    """Causal attention through torch SDPA. q `[s, b, nq, d]`, k/v `[s, b, nkv, d]` -> `[s, b, nq, d]`.

    SDPA takes `[b, heads, s, d]`: the permutes are views, and cuDNN lays its output out like q, so the
    permute back is free too. `backend` forces one SDPA kernel (flash, cudnn, efficient, math).
    """
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d] views
    gqa = q.shape[1] != k.shape[1]
    if gqa and backend in ("efficient", "cudnn"):
        # these kernels may not take enable_gqa: repeat each kv head for its query heads (exact)
        repeats = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
        gqa = False
    kwargs = dict(dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if backend is None:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[backend])):
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out.permute(2, 0, 1, 3)  # [s, b, nq, d]


# --------------------------------------------------------------------------------------------------------
# packed (variable-length) layout

def _packed(t: torch.Tensor) -> torch.Tensor:
    """`[s, b, heads, d]` -> `[b * s, heads, d]`, rows of the batch one after the other (a view when b == 1)."""
    s, b = t.shape[:2]
    if b == 1:
        return t[:, 0].contiguous()
    return t.transpose(0, 1).reshape(b * s, *t.shape[2:]).contiguous()


def _unpacked(t: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """`[b * s, heads, d]` -> `[s, b, heads, d]`."""
    if b == 1:
        return t.unsqueeze(1)
    return t.view(b, s, *t.shape[1:]).transpose(0, 1)


def _whole_rows(s: int, b: int, device) -> tuple[torch.Tensor, int]:
    """cu_seqlens of b rows of s tokens each (one segment per row): int32 `[b + 1]`, and s."""
    return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device), s


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cu_seqlens: Optional[torch.Tensor] = None, window: Optional[int] = None,
                        block: int = 256) -> torch.Tensor:
    """Causal attention per document segment (and per window), SDPA only: the CPU path and the reference.

    q `[s, b, nq, d]`, k/v `[s, b, nkv, d]`; `cu_seqlens` int32 `[n + 1]` over the `b * s` tokens
    flattened row by row (None: each row is one segment); `window` w: keys i - w .. i only.
    Without a window each segment is one causal SDPA call. With one, queries are taken `block` at a
    time against keys from `max(start, first query - w)` on, with a `block x (block + w)` boolean mask.
    """
    s, b = q.shape[:2]
    if cu_seqlens is None:
        cu_seqlens, _ = _whole_rows(s, b, q.device)
    qp, kp, vp = _packed(q), _packed(k), _packed(v)  # [b*s, heads, d]
    gqa = qp.shape[1] != kp.shape[1]
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if window is None:
            seg = [slice(start, end)]
        else:
            seg = [slice(i, min(i + block, end)) for i in range(start, end, block)]
        for rows in seg:
            k_start = start if window is None else max(start, rows.start - window)
            qs = qp[rows].transpose(0, 1)  # [nq, n_q, d]
            ks = kp[k_start:rows.stop].transpose(0, 1)  # [nkv, n_k, d]
            vs = vp[k_start:rows.stop].transpose(0, 1)
            if window is None:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            else:
                qi = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
                kj = torch.arange(k_start, rows.stop, device=q.device)[None, :]
                allowed = (kj <= qi) & (kj >= qi - window)  # [n_q, n_k]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, enable_gqa=gqa)
            out.append(o.transpose(0, 1))  # [n_q, nq, d]
    return _unpacked(torch.cat(out, dim=0), s, b)


def torch_varlen_attention(q, k, v, cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                           window: Optional[int] = None) -> torch.Tensor:
    """Documents and/or a window through torch's `varlen_attn` (CUDA, fp16/bf16). Shapes as above."""
    from torch.nn.attention.varlen import varlen_attn

    s, b = q.shape[:2]
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = _whole_rows(s, b, q.device)
    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "window_size" in params:  # torch >= 2.12: (-1, 0) is causal, (w, 0) causal with a window
        kwargs["window_size"] = (-1 if window is None else window, 0)
    elif window is not None:
        raise NotImplementedError("this torch's varlen_attn has no window_size; use attention_impl: fa4")
    else:
        kwargs["is_causal"] = True
    if q.shape[2] != k.shape[2]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(_packed(q), _packed(k), _packed(v), cu, cu, max_seqlen, max_seqlen, **kwargs)
    return _unpacked(out, s, b)


def _window_size(window: Optional[int]) -> tuple:
    return (None, None) if window is None else (window, 0)


@torch.compiler.disable  # a CuTe-DSL kernel with its own compile cache: compiled layers call it as is
def fa4_attention(q, k, v, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                  window: Optional[int] = None) -> torch.Tensor:
    """FlashAttention-4 (`flash_attn.cute`), causal, optionally per document and/or with a window."""
    fa4 = import_fa4()
    s, b = q.shape[:2]
    kwargs = dict(causal=True, window_size=_window_size(window))
    if cu_seqlens is None:  # [b, s, heads, d] batched call
        out = fa4.flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(0, 1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = fa4.flash_attn_varlen_func(_packed(q), _packed(k), _packed(v), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                     max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return _unpacked(out, s, b)


@torch.compiler.disable
def flash2_attention(q, k, v, dropout_p: float = 0.0, cu_seqlens: Optional[torch.Tensor] = None,
                     max_seqlen: Optional[int] = None, window: Optional[int] = None) -> torch.Tensor:
    """The flash-attn (2.x) package, causal, optionally per document and/or with a window (w, 0)."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    s, b = q.shape[:2]
    kwargs = dict(dropout_p=dropout_p, causal=True)
    if window is not None:
        kwargs["window_size"] = (window, 0)
    if cu_seqlens is None:
        out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), **kwargs)
        return out.transpose(0, 1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = flash_attn_varlen_func(_packed(q), _packed(k), _packed(v), cu, cu, max_seqlen, max_seqlen, **kwargs)
    return _unpacked(out, s, b)


def causal_attention(q, k, v, *, impl: str = "sdpa", sdpa_backend: Optional[str] = None, dropout_p: float = 0.0,
                     cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                     window: Optional[int] = None) -> torch.Tensor:
    """Dispatch to the kernel of `impl` (see the module docstring). q `[s, b, nq, d]` -> `[s, b, nq, d]`."""
    if impl == "fa4":
        return fa4_attention(q, k, v, cu_seqlens, max_seqlen, window)
    if impl == "flash":
        return flash2_attention(q, k, v, dropout_p, cu_seqlens, max_seqlen, window)
    if cu_seqlens is None and window is None:
        return sdpa_causal(q, k, v, dropout_p, sdpa_backend)
    if q.device.type == "cuda":
        return torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, window)
    return reference_attention(q, k, v, cu_seqlens, window)
