"""GPTModel with tensor parallelism 2 and 4 (gloo, 2 and 4 processes), with and without sequence
parallelism, equals the single-process model: logits, loss and every parameter's gradient (sharded ones
compared shard-wise). Under SP every gradient marked `sequence_parallel_grad` is summed over the tensor
group exactly once (a missing sum or a second one would also break the gradient comparison)."""

import torch

from megatron import mpu
from model_test_utils import VOCAB, make_args
from tests.helpers.distributed import run_distributed
from tests.helpers.models import fixed_batch, gathered_vocab_shards, reference_and_parallel

TOL = 2e-5  # fp32, sums reordered by the reductions

# TP=4 needs heads and kv heads divisible by 4
CONFIGS_TP4 = {
    "neox-untied-sequential": dict(num_attention_heads=8, rotary_pct=0.5, no_weight_tying=True),
    "llama-gqa-untied-parallel": dict(num_attention_heads=8, num_kv_heads=4, norm="rmsnorm", activation="swiglu",
                                      use_bias_in_mlp=False, gpt_j_residual=True, no_weight_tying=True),
    "learned-pos-tied": dict(num_attention_heads=8, pos_emb="learned"),
}

CONFIGS = {
    "neox-untied-parallel-residual": dict(rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True),
    "llama-gqa-tied": dict(num_kv_heads=2, norm="rmsnorm", activation="swiglu", use_bias_in_attn_linear=True),
    "learned-pos-tied-relu": dict(pos_emb="learned", activation="relu"),
}


def _check_model(state, overrides):
    model_args, derived = make_args(num_layers=2, **overrides)
    reference, parallel = reference_and_parallel(model_args, derived, state)
    tokens, labels, mask = fixed_batch(VOCAB)

    ref_logits = reference(tokens)
    ref_loss = reference.loss(ref_logits, labels, mask)
    ref_loss.backward()

    logits = parallel(tokens)  # [b, s, V/2]
    assert logits.shape == (2, 16, VOCAB // state.tp_size)
    loss = parallel.loss(logits, labels, mask)
    loss.backward()
    mpu.grads.reset_reduction_counters(parallel)
    summed = mpu.allreduce_sequence_parallel_grads(parallel, state)
    marked = mpu.grads.sequence_parallel_params(parallel)
    if state.sequence_parallel:
        assert marked and summed == len(marked)
        assert all(getattr(p, mpu.grads.REDUCTION_COUNTER) == 1 for p in marked)
    else:
        assert summed == 0

    torch.testing.assert_close(gathered_vocab_shards(logits, state), ref_logits.detach(), atol=TOL, rtol=0)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=TOL, rtol=0)

    ref_params = dict(reference.named_parameters())
    for name, p in parallel.named_parameters():
        expected = ref_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            expected = expected.chunk(state.tp_size, dim=p.partition_dim)[state.tp_rank]
            torch.testing.assert_close(p.detach(), ref_params[name].detach().chunk(
                state.tp_size, dim=p.partition_dim)[state.tp_rank], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(p.grad, expected, atol=TOL, rtol=1e-4, msg=name)


def _check_all(rank, world_size, configs):
    """On a tensor group of all `world_size` ranks, with and without SP, every config."""
    for sequence_parallel in (False, True):
        state = mpu.initialize_model_parallel(world_size, sequence_parallel=sequence_parallel)
        for overrides in configs.values():
            _check_model(state, overrides)
    return "ok"


def test_tensor_and_sequence_parallel_match_single_process():
    assert run_distributed(_check_all, 2, CONFIGS, timeout=180) == ["ok", "ok"]


def test_tensor_parallel_4_matches_single_process():
    assert run_distributed(_check_all, 4, CONFIGS_TP4, timeout=300) == ["ok"] * 4
