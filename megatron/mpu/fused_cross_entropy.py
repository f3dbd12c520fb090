"""Output projection fused with vocab-parallel cross entropy, chunked over tokens.

The plain path computes logits Z = H W^T `[N, V/p]` for all N tokens, then the loss; it keeps Z (and, in
fp32, several copies of it) alive until backward. Here the tokens are processed `chunk_size` rows at a time
and the gradients are computed in the same pass, so no `[N, V/p]` tensor ever exists: the peak extra memory
is about `chunk_size * V/p * 4` bytes for bf16 inputs on CUDA (the chunk's logits and their gradient, both
bf16; the fp32 softmax math is fused into two compiled kernels and never stored), plus the saved gradients `[N, h]` (input dtype) and `[V/p, h]` (fp32).

Notation: p = tensor-parallel size, rank r holds W_r = W[r*V/p : (r+1)*V/p] `[V/p, h]`; H `[N, h]` is
REPLICATED on every rank (the caller applies `copy_to_tensor_parallel_region`, or under sequence
parallelism `gather_from_sequence_parallel_region`, exactly as `ColumnParallelLinear` does); t `[N]` are
global vocabulary ids; a `[N]` are fixed per-token weights (for a masked mean: loss_mask / sum(loss_mask)).

Forward, for each chunk of rows, with z = H_c W_r^T computed in the input dtype and read as fp32:

    m_i   = max_v z_iv                      (local max, all-reduce MAX)
    S_i   = sum_v exp(z_iv - m_i)           (local sum, all-reduce SUM)
    z_it  = the target's logit              (owned by one rank; others add 0; all-reduce SUM, fused with S)
    l_i   = log S_i + m_i - z_it
    L     = sum_i a_i l_i                   (the returned scalar, identical on every rank)

Gradients (the loss is linear in the per-token losses with KNOWN weights a_i, so they are exact for any
upstream scalar g, which only scales them; they are computed in forward and multiplied by g in backward):

    G_iv  = dL/dz_iv = a_i (softmax_iv - [v == t_i])        on this rank's vocabulary shard, fp32
    dL/dW_r = G^T H                                          exact shard gradient (accumulated in fp32)
    dL/dH  = sum_r G_r W_r                                   each rank computes its own term G_r W_r;
                                                             the sum over ranks is the backward of the
                                                             caller's copy (all-reduce) or SP gather
                                                             (reduce-scatter), not done here.

Vocabulary padding: with `vocab_size` V_real below the padded V, each chunk's logits of the padding
columns (global id >= V_real) are set to -inf before the max, as in `cross_entropy.py`: softmax_iv = 0
there, so L is the cross entropy over the real vocabulary and G (hence dL/dW of the padding rows) is 0.

Only `[chunk]`-shaped vectors cross ranks (2 all-reduces per chunk). Works for a tied output layer
(W = the vocab-parallel embedding weight) and an untied one (the ColumnParallelLinear weight, no bias): the
gradient flows back to whichever Parameter is passed as `weight`, through autograd.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cross_entropy import local_real_vocab
from .mappings import all_reduce, group_rank


def _softmax_stats(z: torch.Tensor, m: torch.Tensor, local_t: torch.Tensor, outside: torch.Tensor):
    """z [c, V/p] (any float dtype), m [c] global row max (fp32), local_t [c, 1], outside [c] ->
    (sum_v exp(z_iv - m_i) [c], the target's raw logit z_it [c] (0 where another rank owns it)), fp32."""
    zf = z.float()
    sum_exp = torch.exp(zf - m.unsqueeze(-1)).sum(dim=-1)
    z_t = zf.gather(-1, local_t).squeeze(-1).masked_fill(outside, 0.0)
    return sum_exp, z_t


def _softmax_grad(z: torch.Tensor, m: torch.Tensor, scale: torch.Tensor, local_t: torch.Tensor,
                  target_weight: torch.Tensor) -> torch.Tensor:
    """G = scale_i * exp(z_iv - m_i) + [v == t_i] * target_weight_i, in z's dtype; [c, V/p].

    With scale = a / S and target_weight = -a (0 where another rank owns the target) this is
    a_i (softmax_iv - onehot_iv), the gradient of the weighted loss with respect to the logits."""
    zf = z.float()
    columns = torch.arange(z.shape[-1], device=z.device)
    g = torch.exp(zf - m.unsqueeze(-1)) * scale.unsqueeze(-1)
    g = g + torch.where(columns == local_t, target_weight.unsqueeze(-1), 0.0)
    return g.to(z.dtype)


class _CompiledWithEagerFallback:
    """`torch.compile(fn, fullgraph=True)`, falling back to `fn` itself (same math, more memory traffic)
    with one warning if compilation fails, e.g. on a GPU without a working Triton."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, fullgraph=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any compiler failure: the eager function is exact
                warnings.warn(f"fused cross entropy: compiling {self.fn.__name__} failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}); running it eagerly")
                self.compiled = None
        return self.fn(*args)


_COMPILED_KERNELS = None


def _chunk_kernels(device: torch.device):
    """The per-chunk elementwise work, as (stats, grad) functions.

    On CUDA they are compiled (torch.compile, Triton): each reads the chunk's logits in their own dtype
    once and keeps the fp32 values in registers, where the eager ops would write and re-read several
    fp32 `[c, V/p]` tensors (on an H100 at 16k tokens x 50k vocab those eager passes took ~12 ms of a
    132 ms step: torch.profiler, docs/PERFORMANCE.md). Elsewhere (CPU tests, fp32) they run eagerly;
    the math is the same."""
    global _COMPILED_KERNELS
    if device.type != "cuda":
        return _softmax_stats, _softmax_grad
    if _COMPILED_KERNELS is None:
        _COMPILED_KERNELS = (_CompiledWithEagerFallback(_softmax_stats), _CompiledWithEagerFallback(_softmax_grad))
    return _COMPILED_KERNELS


def accumulate_product_fp32(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b for an fp32 `total` and fp32, bf16 or fp16 `a`, `b`.

    Half-precision products go through cuBLAS with an fp32 output (torch's `addmm(..., out_dtype=float32)`,
    CUDA only): the GEMM accumulates in fp32 and adds into `total` in its epilogue (beta = 1), so the chunk's
    product is neither rounded to bf16 nor written and read back by a separate mixed-dtype add (~1 TB/s,
    per-tensor: 0.8 ms per 410M step). Elsewhere: the product in the inputs' dtype, then an fp32 add."""
    if a.dtype == torch.float32:
        total.addmm_(a, b)
    elif a.is_cuda and _fp32_output_gemm_available():
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.add_(a @ b)


_FP32_OUTPUT_GEMM: bool | None = None


def _fp32_output_gemm_available() -> bool:
    """Whether this torch has CUDA `addmm` with `out_dtype` (torch >= 2.8 on CUDA); checked once."""
    global _FP32_OUTPUT_GEMM
    if _FP32_OUTPUT_GEMM is None:
        try:
            x = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
            total = torch.zeros(2, 2, device="cuda")
            torch.addmm(total, x, x, out_dtype=torch.float32, out=total)
            _FP32_OUTPUT_GEMM = bool((total == 2.0).all())
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUTPUT_GEMM = False
    return _FP32_OUTPUT_GEMM


class _FusedLinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                token_weights: torch.Tensor, group: Any, chunk_size: int, compute_grad: bool,
                vocab_size: Optional[int]):
        n = hidden.shape[0]
        vocab_per_rank = weight.shape[0]
        start = group_rank(group) * vocab_per_rank
        real = local_real_vocab(vocab_per_rank, group_rank(group), vocab_size)  # columns [real, V/p): padding
        need_h = compute_grad and ctx.needs_input_grad[0]
        need_w = compute_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        token_weights = token_weights.to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)

        stats_fn, grad_fn = _chunk_kernels(hidden.device)
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            h_c, t_c, a_c = hidden[lo:hi], target[lo:hi], token_weights[lo:hi]
            z = F.linear(h_c, weight)                                           # [c, V/p] input dtype
            if real < vocab_per_rank:
                z[:, real:] = float("-inf")                                     # padding: probability 0
            m = all_reduce(z.amax(dim=-1).float(), group, op=dist.ReduceOp.MAX)  # [c] (exact in bf16)

            outside = (t_c < start) | (t_c >= start + vocab_per_rank)           # [c]
            local_t = (t_c - start).masked_fill(outside, 0).unsqueeze(-1)       # [c, 1]
            sum_exp, z_t = stats_fn(z, m, local_t, outside)                     # [c], [c] fp32
            stats = all_reduce(torch.stack([sum_exp, z_t]), group)              # [2, c]
            sum_exp, z_t = stats[0], stats[1]
            total += ((sum_exp.log() + m - z_t) * a_c).sum()

            if need_h or need_w:
                g = grad_fn(z, m, a_c / sum_exp, local_t, (-a_c).masked_fill(outside, 0.0))  # [c, V/p]
                del z
                if need_h:
                    torch.mm(g, weight, out=grad_h[lo:hi])                      # this rank's term of dL/dH
                if need_w:
                    accumulate_product_fp32(grad_w, g.t(), h_c)                  # grad_w += G^T H_c, fp32
                del g  # free before the next chunk's logits: one chunk's buffers alive at a time
            else:
                del z

        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_total.float()
        if grad_h is not None:
            grad_h = grad_h * scale if grad_h.dtype == torch.float32 else (grad_h.float() * scale).to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               token_weights: torch.Tensor, group: Any, chunk_size: int = 4096,
                               vocab_size: Optional[int] = None) -> torch.Tensor:
    """sum_i token_weights[i] * cross_entropy(hidden[i] @ W^T, target[i]), W sharded by vocabulary over `group`.

    hidden `[N, h]` (bf16/fp16/fp32, replicated over `group`: see the module docstring), weight `[V/p, h]` of
    the same dtype, target `[N]` int64 global vocabulary ids, token_weights `[N]` (no gradient; for a masked
    mean pass loss_mask / loss_mask.sum()). Returns an fp32 scalar. The logits are computed `chunk_size`
    tokens at a time and never stored; with a `None` or size-1 group this equals
    `(F.cross_entropy((hidden @ weight.T).float(), target, reduction='none') * token_weights).sum()`.
    `vocab_size` (default: every row of `weight`) is the real vocabulary: the padding rows take no
    probability (the same sum with `weight[:vocab_size]`).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} must be [N, h] and weight "
                         f"{tuple(weight.shape)} [V/p, h].")
    if target.shape != hidden.shape[:1] or token_weights.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: target {tuple(target.shape)} and token_weights "
                         f"{tuple(token_weights.shape)} must be [N] = [{hidden.shape[0]}].")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) "
                         f"must have the same dtype.")
    if int(chunk_size) < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, target, token_weights.detach(), group,
                                          int(chunk_size), compute_grad, vocab_size)
