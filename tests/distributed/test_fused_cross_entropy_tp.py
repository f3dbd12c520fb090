"""Fused output projection + vocab-parallel cross entropy with tensor parallelism 2 (2 gloo processes).

mpu level: each rank holds half of the vocabulary; the hidden states are replicated through
copy_to_tensor_parallel_region (or, under sequence parallelism, all-gathered from token shards), and the
loss, the hidden-state gradient and each weight shard's gradient equal the single-process F.cross_entropy
reference on full logits (fp32), for chunk sizes that divide the token count or not.
Model level: GPTModel(tokens, labels, loss_mask) at TP=2, with and without SP, tied and untied, fused
(two chunk sizes) and plain, equals the single-process model's loss(forward(tokens)) in loss and in every
parameter's gradient (sharded ones shard-wise, SP-marked ones after the once-per-step tensor-group sum)."""

import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.neox_args.sections import DerivedArgs, ModelArgs
from tests.helpers.distributed import run_distributed
from tests.helpers.models import assert_grads_match_reference, fixed_batch, reference_and_parallel

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32, sums reordered by the reductions
N, H, V = 30, 16, 64
VOCAB = 128


def _reference(hidden, weight, target, mask):
    per_token = F.cross_entropy(hidden @ weight.t(), target, reduction="none")
    return (per_token * mask).sum() / mask.sum()


def _check_mpu(state, sequence_parallel, chunk_size):
    gen = torch.Generator().manual_seed(11)  # identical on both ranks
    hidden = torch.randn(N, H, generator=gen)
    weight = 0.5 * torch.randn(V, H, generator=gen)
    target = torch.randint(0, V, (N,), generator=gen)
    mask = (torch.rand(N, generator=gen) > 0.3).float()

    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = _reference(h_ref, w_ref, target, mask)
    (2.5 * ref).backward()

    group, r, p = state.tp_group, state.tp_rank, state.tp_size
    w_shard = weight.chunk(p, dim=0)[r].clone().requires_grad_(True)
    if sequence_parallel:  # this rank's token shard, all-gathered (backward: reduce-scatter)
        h_local = hidden.chunk(p, dim=0)[r].clone().requires_grad_(True)
        h_full = mpu.gather_from_sequence_parallel_region(h_local, group, seq_dim=0)
    else:  # replicated (backward: all-reduce of each rank's partial dL/dH)
        h_local = hidden.clone().requires_grad_(True)
        h_full = mpu.copy_to_tensor_parallel_region(h_local, group)
    loss = mpu.fused_linear_cross_entropy(h_full, w_shard, target, mask / mask.sum(), group, chunk_size)
    (2.5 * loss).backward()

    msg = f"sp={sequence_parallel} chunk={chunk_size}"
    torch.testing.assert_close(loss.detach(), ref.detach(), **TOL, msg=msg)
    expected_h = h_ref.grad.chunk(p, dim=0)[r] if sequence_parallel else h_ref.grad
    torch.testing.assert_close(h_local.grad, expected_h, **TOL, msg=msg)
    torch.testing.assert_close(w_shard.grad, w_ref.grad.chunk(p, dim=0)[r], **TOL, msg=msg)


def _make_args(**overrides):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, intermediate_size=64)
    fields.update(overrides)
    model = ModelArgs(**fields)
    derived = DerivedArgs(num_kv_heads=model.num_kv_heads or model.num_attention_heads,
                          intermediate_size=model.intermediate_size, max_position_embeddings=model.seq_length,
                          vocab_size=VOCAB, padded_vocab_size=VOCAB)
    return model, derived


def _check_model(state, overrides, fused, chunk):
    model_args, derived = _make_args(fused_cross_entropy=fused, cross_entropy_chunk_size=chunk, **overrides)
    reference, parallel = reference_and_parallel(model_args, derived, state)
    tokens, labels, mask = fixed_batch(VOCAB)

    ref_loss = reference.loss(reference(tokens), labels, mask)
    ref_loss.backward()
    loss = parallel(tokens, labels, mask)
    loss.backward()
    mpu.allreduce_sequence_parallel_grads(parallel, state)

    msg = f"{overrides} fused={fused} chunk={chunk} sp={state.sequence_parallel}"
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TOL, msg=msg)
    assert_grads_match_reference(parallel, reference, state, msg, **TOL)


def _tp2(rank, world_size):
    state = mpu.initialize_model_parallel(2)
    for sequence_parallel in (False, True):
        for chunk_size in (1, 4, 7, 4096):
            _check_mpu(state, sequence_parallel, chunk_size)
    configs = (dict(), dict(no_weight_tying=True, gpt_j_residual=True, rotary_pct=0.25))
    for sequence_parallel in (False, True):
        state = mpu.initialize_model_parallel(2, sequence_parallel=sequence_parallel)
        for overrides in configs:
            for fused, chunk in ((False, 4096), (True, 4096), (True, 5)):
                _check_model(state, overrides, fused, chunk)
    return "ok"


def test_fused_cross_entropy_tp2_with_and_without_sequence_parallel():
    assert run_distributed(_tp2, 2, timeout=240) == ["ok"] * 2
