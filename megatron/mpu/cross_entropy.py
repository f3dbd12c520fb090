"""Cross entropy over logits sharded along the vocabulary, without gathering the logits.

Rank r holds z_r = logits[..., r*V/p : (r+1)*V/p]. For a target t, in fp32:

    m      = max_v z_v                       (local max, then all-reduce MAX)
    S      = sum_v exp(z_v - m)              (local sum, then all-reduce SUM)
    z_t    = the target's logit minus m      (only the owning rank has it; all-reduce SUM of 0/z_t)
    loss   = log S - (z_t - m)

Backward on the local shard: dloss/dz_v = softmax_v - [v == t], with softmax_v = exp(z_v - m) / S,
times the incoming per-token gradient. Only [...]-shaped tensors cross ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .mappings import all_reduce, group_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Any):
        input_dtype = logits.dtype
        z = logits.float()                                                      # [..., V/p] fp32
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
        return grad.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Any) -> torch.Tensor:
    """Per-token cross entropy `[...]` (fp32) for logits `[..., V/p]` sharded over `group`.

    `target` `[...]` int64 holds global vocabulary ids. Logits of any float dtype are computed in fp32.
    With a `None` or size-1 group this is exactly `F.cross_entropy(logits.float(), target, reduction='none')`.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} must agree on every dim but the last.")
    return _VocabParallelCrossEntropy.apply(logits, target, group)
