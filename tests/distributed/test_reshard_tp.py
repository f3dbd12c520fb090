"""Resharded weights are what a real TP=2 model holds (2 gloo processes): `split_tp` of a TP=1 state dict
equals, shard for shard, the state of a TP=2 GPTModel initialized from the same seed; loaded with
load_state_dict(strict=True) into a TP=2 model initialized otherwise, the shards give the TP=1 model's
logits (1e-5); and `merge_tp_shards` of the ranks' state dicts gives the TP=1 state dict back."""

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.checkpointing.reshard import merge_tp_shards, split_tp
from megatron.model import GPTModel
from tests.helpers.distributed import run_distributed
from tests.unit.model.model_test_utils import VOCAB, make_args

CONFIGS = {
    "neox-parallel-residual-untied": dict(gpt_j_residual=True, no_weight_tying=True, rotary_pct=0.25),
    "llama-gqa-swiglu-tied-rmsnorm": dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm",
                                          use_bias_in_mlp=False),
}


def _check_config(state, overrides):
    model, derived = make_args(**overrides)
    torch.manual_seed(11)
    reference = GPTModel(model, derived, mpu.ParallelState.single())
    full = reference.state_dict()
    shards = split_tp(full, model, derived, state.tp_size)

    torch.manual_seed(11)  # initialization does not depend on the TP size: same seed, same weights
    same_init = GPTModel(model, derived, state).state_dict()
    assert list(same_init) == list(shards[state.tp_rank])
    for key, tensor in same_init.items():
        assert torch.equal(tensor, shards[state.tp_rank][key]), key

    torch.manual_seed(99)
    parallel = GPTModel(model, derived, state)
    parallel.load_state_dict(shards[state.tp_rank], strict=True)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, logits = reference(tokens), parallel(tokens)  # [b, s, V], [b, s, V/tp]
    gathered = [torch.empty_like(logits) for _ in range(state.tp_size)]
    dist.all_gather(gathered, logits.contiguous(), group=state.tp_group)
    torch.testing.assert_close(torch.cat(gathered, dim=-1), expected, atol=1e-5, rtol=0)

    held = [None] * state.tp_size
    dist.all_gather_object(held, parallel.state_dict(), group=state.tp_group)
    merged = merge_tp_shards(held, model, derived)
    assert list(merged) == list(full) and all(torch.equal(merged[k], full[k]) for k in full)


def _check_all(rank, world_size):
    state = mpu.initialize_model_parallel(world_size)
    for overrides in CONFIGS.values():
        _check_config(state, overrides)


def test_split_shards_are_what_a_tp2_model_holds():
    run_distributed(_check_all, 2)
