"""Full (unpartitioned) weights into a model whose parameters ZeRO stage 3 has partitioned.

DeepSpeed's `engine.load_checkpoint(load_module_only=True)` under ZeRO-3 reads only the per-rank partition
files a ZeRO-3 save writes (`zero_pp_rank_*_mp_rank_XX_model_states.pt`). A checkpoint saved at ZeRO stage
0-2, or written by tools/ckpts (reshard, conversion), holds the whole module of each tensor rank in
`mp_rank_XX_model_states.pt` instead, which DeepSpeed then fails to load. `load_full_state_into_zero3`
copies such a state dict into the partitioned parameters, one parameter at a time:

    with GatheredParameters([p], modifier_rank=0):   # p.data is the full tensor on every rank here
        p.data.copy_(state[name])                    # on exit, rank 0's copy is partitioned again

Every data-parallel rank reads the same file (its tensor rank's), so all ranks hold the same values and
the broadcast from rank 0 changes nothing; peak memory is the largest single parameter. The optimizer's
fp32 master copies were made from the old values: the caller refreshes them (`refresh_fp32_params`).
"""

from __future__ import annotations

import torch

from megatron.checkpointing.layout import CheckpointError


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The unpartitioned shape of a parameter (`ds_shape` once ZeRO-3 has partitioned it)."""
    return getattr(param, "ds_shape", param.shape)


def check_state_matches(module: torch.nn.Module, state: dict, path: str) -> None:
    """Refuse, naming the keys, a state dict whose parameter names or full shapes differ from `module`'s."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    wrong = [f"{name}: checkpoint {tuple(state[name].shape)}, model {tuple(full_shape(param))}"
             for name, param in params.items() if name in state and state[name].shape != full_shape(param)]
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + \
               ([f"not in the model: {', '.join(unexpected)}"] if unexpected else []) + wrong
    if problems:
        raise CheckpointError(f"load: the weights in {path} do not fit this model:\n  " + "\n  ".join(problems))


@torch.no_grad()
def load_full_state_into_zero3(module: torch.nn.Module, state: dict, path: str) -> None:
    """Copy `state` (full tensors, `module`'s parameter names) into `module`'s ZeRO-3 partitions."""
    import deepspeed

    check_state_matches(module, state, path)
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(state[name].to(device=param.device, dtype=param.dtype))
