"""partition_activations at tensor parallelism 2 (2 gloo processes): with checkpoint_activations, each rank
keeps only its half (along h) of every checkpointed chunk's input and all-gathers it to recompute; loss and
every gradient equal the single-process model without checkpointing (fp32)."""

import torch

from megatron import mpu
from megatron.model import GPTModel
from megatron.neox_args.sections import DerivedArgs, ModelArgs
from tests.helpers.distributed import run_distributed
from tests.helpers.models import assert_grads_match_reference, fixed_batch

TOL = dict(atol=2e-5, rtol=1e-4)
VOCAB = 128


def _tp2(rank, world_size):
    state = mpu.initialize_model_parallel(2)
    model_args = ModelArgs(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16, intermediate_size=64,
                           pos_emb="rotary", hidden_dropout=0.1)
    derived = DerivedArgs(num_kv_heads=4, intermediate_size=64, max_position_embeddings=16, vocab_size=VOCAB,
                          padded_vocab_size=VOCAB)
    torch.manual_seed(7)
    reference = GPTModel(model_args, derived, mpu.ParallelState.single())
    torch.manual_seed(7)
    parallel = GPTModel(model_args, derived, state, checkpoint_activations=True, checkpoint_num_layers=2,
                        partition_activations=True)
    tokens, labels, mask = fixed_batch(VOCAB)
    reference.eval(), parallel.eval()  # no dropout: the reference runs single-process
    parallel.training = True  # checkpointing runs only in training mode; dropout modules stay in eval
    for module in parallel.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()

    gathered_shapes = []
    original = mpu.mappings.gather_from_tensor_parallel_region

    def spy(x, group):
        gathered_shapes.append(tuple(x.shape))
        return original(x, group)

    mpu.mappings.gather_from_tensor_parallel_region = spy
    try:
        loss = parallel(tokens, labels, mask)
        loss.backward()
    finally:
        mpu.mappings.gather_from_tensor_parallel_region = original
    ref_loss = reference(tokens, labels, mask)
    ref_loss.backward()

    # 2 chunks (layers 0-1, 2), each gathered in forward and again in the recompute: inputs [s, b, h/2]
    assert gathered_shapes == [(16, 2, 16)] * 4, gathered_shapes
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TOL)
    assert_grads_match_reference(parallel, reference, state, **TOL)
    return "ok"


def test_partition_activations_tp2_matches_the_unpartitioned_model():
    assert run_distributed(_tp2, 2, timeout=240) == ["ok"] * 2
