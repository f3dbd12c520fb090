"""The optimizer, built by us and handed to `deepspeed.initialize`.

Weight decay applies to matrices only: norms, biases and every other 1-D parameter get none (GPT-NeoX and
Megatron do the same). Adam and AdamW both use decoupled decay (AdamW's update). On GPU the torch fused
kernel is used; when ZeRO offloads the optimizer to the CPU, DeepSpeed's CPU Adam is used instead.
"""

from __future__ import annotations

import torch

from megatron.engine.optimizer_kind import offloads_optimizer_to_cpu
from megatron.neox_args.sections import OptimizerArgs


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and undecayed 1-D parameters (norm weights, biases)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, args: OptimizerArgs, zero_optimization: dict,
                    device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    if args.optimizer_type == "SGD":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    if offloads_optimizer_to_cpu(zero_optimization):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps, adamw_mode=True)
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps, fused=fused)
