"""Cross entropy over logits sharded along the vocabulary, without gathering the logits.

Rank r holds z_r = logits[..., r*V/p : (r+1)*V/p]. For a target t, in fp32:

    m      = max_v z_v                       (local max, then all-reduce MAX)
    S      = sum_v exp(z_v - m)              (local sum, then all-reduce SUM)
    z_t    = the target's logit minus m      (only the owning rank has it; all-reduce SUM of 0/z_t)
    loss   = log S - (z_t - m)

Backward on the local shard: dloss/dz_v = softmax_v - [v == t], with softmax_v = exp(z_v - m) / S,
times the incoming per-token gradient. Only [...]-shaped tensors cross ranks.

Vocabulary padding: with `vocab_size` V_real < the padded V, the columns v >= V_real (they exist only
so that V divides evenly over ranks) are set to -inf before the max, so exp(z_v - m) = 0: they take no
probability, the loss is the cross entropy over the real vocabulary alone, whatever the padding (and so
the tensor-parallel size), and their logits get a zero gradient.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .mappings import all_reduce, group_rank


def local_real_vocab(vocab_per_rank: int, rank: int, vocab_size: Optional[int]) -> int:
    """How many of this rank's `vocab_per_rank` columns [rank*V/p, (rank+1)*V/p) are real vocabulary ids
    (< vocab_size; None: all of them). 0 when the shard is all padding."""
    if vocab_size is None:
        return vocab_per_rank
    return max(0, min(vocab_per_rank, vocab_size - rank * vocab_per_rank))


def mask_padded_vocab(logits: torch.Tensor, rank: int, vocab_size: Optional[int]) -> torch.Tensor:
    """logits [..., V/p] (rank's shard) with the padding columns (global id >= vocab_size) set to -inf
    (probability exactly 0); the same tensor when the shard has no padding. Out of place."""
    real = local_real_vocab(logits.shape[-1], rank, vocab_size)
    if real == logits.shape[-1]:
        return logits
    padding = torch.arange(logits.shape[-1], device=logits.device) >= real  # [V/p]
    return logits.masked_fill(padding, float("-inf"))


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Any, vocab_size: Optional[int]):
        input_dtype = logits.dtype
        z = mask_padded_vocab(logits.float(), group_rank(group), vocab_size)    # [..., V/p] fp32
        local_max = z.max(dim=-1).values                                        # [...]
        global_max = all_reduce(local_max, group, op=dist.ReduceOp.MAX)
        shifted = z - global_max.unsqueeze(-1)                                  # new tensor, [..., V/p]

        vocab_per_rank = z.size(-1)
        start = group_rank(group) * vocab_per_rank
        outside = (target < start) | (target >= start + vocab_per_rank)         # [...]
        local_target = (target - start).masked_fill(outside, 0)                 # [...]
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        target_logit = all_reduce(target_logit, group)                          # [...]

        exp_logits = shifted.exp_()                                             # in place on our copy
        sum_exp = all_reduce(exp_logits.sum(dim=-1), group)                     # [...]
        loss = torch.log(sum_exp) - target_logit                                # [...]

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))                        # [..., V/p]
        ctx.input_dtype = input_dtype
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax.clone()                                                  # [..., V/p]
        onehot_value = (~outside).to(grad.dtype).unsqueeze(-1)                  # 1 where target is local
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot_value)
        grad.mul_(grad_loss.float().unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Any,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token cross entropy `[...]` (fp32) for logits `[..., V/p]` sharded over `group`.

    `target` `[...]` int64 holds global vocabulary ids (< vocab_size). Logits of any float dtype are
    computed in fp32. `vocab_size` (default: every column) is the real vocabulary: padding columns take
    no probability. With a `None` or size-1 group and no padding this is exactly
    `F.cross_entropy(logits.float(), target, reduction='none')`; with padding, the same over
    `logits[..., :vocab_size]`.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} must agree on every dim but the last.")
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size)
