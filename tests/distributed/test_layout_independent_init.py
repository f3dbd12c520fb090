"""TP=2 (2 gloo processes) builds the TP=1 model whatever the vocabulary padding: with 100 real ids padded
to 128 at TP=1 and to 128 or 256 at TP=2 (256: rank 1's whole shard is padding), the gathered TP=2 weights
are the TP=1 weights on the real rows and zero on the padding, and the loss (fused and plain cross
entropy) and the gradients of the real rows equal TP=1's (fp32, 1e-5), the padding rows' gradients zero."""

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.checkpointing.reshard import merge_tp_shards
from megatron.model import GPTModel
from tests.helpers.distributed import run_distributed
from tests.unit.model.model_test_utils import make_args

VOCAB, SEED = 100, 2024
CONFIGS = [dict(no_weight_tying=True, pos_emb="learned"),
           dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm", use_bias_in_mlp=False)]


def _run(gpt, fused, tokens, labels, mask):
    gpt.fused_cross_entropy = fused
    gpt.zero_grad()
    loss = gpt(tokens, labels, mask)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in gpt.named_parameters()}


def _gather(state, tensors: dict, model, derived) -> dict:
    held = [None] * state.tp_size
    dist.all_gather_object(held, tensors, group=state.tp_group)
    return merge_tp_shards(held, model, derived)


def _check(rank, world_size):
    state = mpu.initialize_model_parallel(world_size)
    gen = torch.Generator().manual_seed(5)
    tokens, labels = torch.randint(0, VOCAB, (2, 16), generator=gen), torch.randint(0, VOCAB, (2, 16), generator=gen)
    mask = (torch.rand(2, 16, generator=gen) > 0.2).float()
    for overrides in CONFIGS:
        model, derived = make_args(**overrides)
        derived.vocab_size, derived.padded_vocab_size = VOCAB, 128
        reference = GPTModel(model, derived, mpu.ParallelState.single(), init_seed=SEED)
        for padded in (128, 256):
            derived_tp = make_args(**overrides)[1]
            derived_tp.vocab_size, derived_tp.padded_vocab_size = VOCAB, padded
            parallel = GPTModel(model, derived_tp, state, init_seed=SEED)
            full = _gather(state, parallel.state_dict(), model, derived_tp)
            for key, ref in reference.state_dict().items():
                got = full[key]
                if got.shape != ref.shape:
                    assert torch.count_nonzero(got[VOCAB:]) == 0, key
                    got, ref = got[:VOCAB], ref[:VOCAB]
                assert torch.equal(got, ref), (key, padded)
            for fused in (True, False):
                loss_ref, grads_ref = _run(reference, fused, tokens, labels, mask)
                loss, grads = _run(parallel, fused, tokens, labels, mask)
                torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
                grads = _gather(state, grads, model, derived_tp)
                for key, ref in grads_ref.items():
                    got = grads[key]
                    if got.shape != ref.shape:
                        assert torch.count_nonzero(got[VOCAB:]) == 0, key
                        got, ref = got[:VOCAB], ref[:VOCAB]
                    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{key} padded {padded}")


def test_tp2_at_any_padding_is_the_tp1_model():
    run_distributed(_check, 2)
