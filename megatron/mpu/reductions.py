"""The reductions of the training loop (not autograd functions: values the loop reports).

- `grad_norm(parameters, parallel)`: the unclipped L2 norm of the whole model's gradient,

      ||g|| = sqrt( sum over tensor ranks, pipeline stages of sum_p ||g_p||^2 ),

  each parameter counted once: tensor-parallel shards (`tensor_model_parallel`) on every tensor rank,
  replicated parameters on tensor rank 0 only; a parameter that lives on two pipeline stages (the tied
  embedding) once: DeepSpeed's PipelineModule marks the copies that must not count `ds_pipe_replicated`.
  Gradients are already averaged over data parallel when it is called, so that group takes no part.
- `data_parallel_mean(value, parallel)`: a device scalar averaged over the data-parallel group, as a float.
(The loss of a pipeline step exists on the last stage only: DeepSpeed's PipelineEngine averages it over
data parallel and broadcasts it over the pipeline group itself, megatron/engine/steps.py.)
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

PIPELINE_DUPLICATE = "ds_pipe_replicated"  # the attribute name DeepSpeed's PipelineModule sets


def _active(group, size: int) -> bool:
    return group is not None and size > 1 and dist.is_initialized()


def grad_norm(parameters: Iterable[torch.nn.Parameter], parallel) -> torch.Tensor:
    """L2 norm of the full gradient (all tensor ranks and pipeline stages), before clipping; a device
    fp32 scalar (see the module docstring)."""
    parameters = list(parameters)
    device = parameters[0].device if parameters else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for param in parameters:
        if param.grad is None or getattr(param, PIPELINE_DUPLICATE, False):
            continue
        if getattr(param, "tensor_model_parallel", False) or parallel.tp_rank == 0:
            squares += param.grad.detach().float().pow(2).sum()
    if _active(parallel.tp_group, parallel.tp_size):
        dist.all_reduce(squares, group=parallel.tp_group)
    if _active(parallel.pp_group, parallel.pp_size):
        dist.all_reduce(squares, group=parallel.pp_group)
    return squares.sqrt()


def data_parallel_mean(value: torch.Tensor, parallel) -> float:
    """Average a device scalar over the data-parallel group and copy it to the host."""
    value = value.detach().clone().float()
    if _active(parallel.dp_group, parallel.dp_size):
        dist.all_reduce(value, group=parallel.dp_group)
        value /= parallel.dp_size
    return float(value)
