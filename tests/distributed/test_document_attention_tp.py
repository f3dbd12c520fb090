"""Document-aware attention and MLP chunking under tensor parallelism 2, with and without sequence
parallelism (2 gloo processes), equal the single-process model: logits, loss and every parameter's
gradient (sharded ones shard-wise, SP-marked ones after the once-per-step tensor-group sum). One case
runs the parallel model with checkpoint_keep_attention (and partition_activations, which applies
without SP) against the un-checkpointed reference.

The document boundaries (`cu_seqlens`) and `position_ids` are built once from the full sequence (as the
data loader does) and given unchanged to every rank: attention runs on the gathered sequence, and the
learned position embedding takes its own shard of the positions under SP."""

import torch

from megatron import mpu
from megatron.data.doc_masks import DocumentMasking, document_fields
from megatron.neox_args.sections import DerivedArgs, ModelArgs
from tests.helpers.distributed import run_distributed
from tests.helpers.models import assert_grads_match_reference, gathered_vocab_shards, reference_and_parallel

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32, sums reordered by the reductions
VOCAB, EOD = 128, 0

CONFIGS = {
    "rotary-docs-chunked": dict(rotary_pct=0.5, mlp_chunk_size=5),
    "learned-gqa-docs": dict(pos_emb="learned", num_kv_heads=2, activation="swiglu", norm="rmsnorm"),
    "rotary-window": dict(sliding_window_width=3, gpt_j_residual=True),
    "rotary-docs-keep-attention": dict(rotary_pct=0.5, mlp_chunk_size=5, checkpoint_activations=True,
                                       checkpoint_keep_attention=True, partition_activations=True),
}
PARALLEL_ONLY = ("checkpoint_activations", "checkpoint_keep_attention", "partition_activations")


def _args(**overrides):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, intermediate_size=64)
    fields.update(overrides)
    model = ModelArgs(**fields)
    derived = DerivedArgs(num_kv_heads=model.num_kv_heads or 4, intermediate_size=64, max_position_embeddings=16,
                          vocab_size=VOCAB, padded_vocab_size=VOCAB)
    return model, derived


def _check(state, overrides):
    overrides = dict(overrides)
    kwargs = {k: overrides.pop(k) for k in PARALLEL_ONLY if k in overrides}
    model_args, derived = _args(**overrides)
    reference, parallel = reference_and_parallel(model_args, derived, state, **kwargs)
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(1, VOCAB, (2, 16), generator=gen)
    tokens[0, [2, 11]] = EOD
    tokens[1, [5, 6]] = EOD
    labels = torch.randint(0, VOCAB, (2, 16), generator=gen)
    fields = document_fields(tokens, DocumentMasking(EOD, True, True, True))
    docs = dict(position_ids=fields["position_ids"], cu_seqlens=fields["cu_seqlens"], max_seqlen=fields["max_seqlen"])
    mask = fields["loss_mask"]

    ref_logits = reference(tokens, **docs)
    ref_loss = reference.loss(ref_logits, labels, mask)
    ref_loss.backward()
    logits = parallel(tokens, **docs)
    loss = parallel.loss(logits, labels, mask)
    loss.backward()
    mpu.allreduce_sequence_parallel_grads(parallel, state)

    torch.testing.assert_close(gathered_vocab_shards(logits, state), ref_logits.detach(), **TOL)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TOL)
    assert_grads_match_reference(parallel, reference, state, **TOL)
    # and the fused loss path (labels given to the model) agrees with the logits path
    parallel.zero_grad()
    fused = parallel(tokens, labels, mask, **docs)
    torch.testing.assert_close(fused.detach(), ref_loss.detach(), **TOL)


def _check_all(rank, world_size):
    for sequence_parallel in (False, True):
        state = mpu.initialize_model_parallel(world_size, sequence_parallel=sequence_parallel)
        for overrides in CONFIGS.values():
            _check(state, overrides)
    return "ok"


def test_documents_windows_and_chunks_under_tensor_and_sequence_parallelism():
    assert run_distributed(_check_all, 2, timeout=180) == ["ok", "ok"]
