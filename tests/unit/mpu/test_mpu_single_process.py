"""megatron.mpu in one process (tensor-parallel size 1, `None` groups): the layers equal their
torch counterparts, collectives are the identity, and the single-process state needs no
torch.distributed. Tolerance: 1e-6 absolute in fp32 unless stated (same math, same order)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu
from megatron.mpu import grads


def test_single_state_and_deepspeed_adapter():
    state = mpu.ParallelState.single()
    assert (state.tp_size, state.pp_size, state.dp_size, state.world_size) == (1, 1, 1, 1)
    assert state.tp_group is None and state.dp_group is None and not state.sequence_parallel
    adapter = state.deepspeed_mpu()
    assert adapter.get_model_parallel_rank() == 0 and adapter.get_model_parallel_world_size() == 1
    assert adapter.get_data_parallel_world_size() == 1 and adapter.get_data_parallel_group_ranks() == [0]
    assert adapter.get_tensor_model_parallel_world_size() == 1
    assert mpu.ParallelState.single(sequence_parallel=True).sequence_parallel


def test_initialize_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="ParallelState.single"):
        mpu.initialize_model_parallel(1)


def test_mappings_are_identity_without_group():
    x = torch.randn(4, 2, 3, requires_grad=True)
    for fn in (mpu.copy_to_tensor_parallel_region, mpu.reduce_from_tensor_parallel_region,
               mpu.scatter_to_tensor_parallel_region, mpu.gather_from_tensor_parallel_region):
        assert fn(x, None) is x
    for fn in (mpu.scatter_to_sequence_parallel_region, mpu.gather_from_sequence_parallel_region,
               mpu.reduce_scatter_to_sequence_parallel_region):
        assert fn(x, None, seq_dim=1) is x


def test_linear_layers_equal_nn_linear():
    torch.manual_seed(0)
    col = mpu.ColumnParallelLinear(6, 10, tp_group=None)
    row = mpu.RowParallelLinear(10, 6, tp_group=None)
    with torch.no_grad():
        col.bias.normal_()
        row.bias.normal_()
    x = torch.randn(5, 2, 6, requires_grad=True)
    out = row(col(x))
    expected = F.linear(F.linear(x, col.weight, col.bias), row.weight, row.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert col.weight.shape == (10, 6) and row.weight.shape == (6, 10)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    assert row.weight.tensor_model_parallel and row.weight.partition_dim == 1
    assert not hasattr(row.bias, "sequence_parallel_grad")


def test_skip_bias_add_leaves_bias_to_caller():
    torch.manual_seed(0)
    col = mpu.ColumnParallelLinear(4, 6, tp_group=None, skip_bias_add=True)
    row = mpu.RowParallelLinear(6, 4, tp_group=None, skip_bias_add=True, sequence_parallel=True)
    with torch.no_grad():
        col.bias.fill_(1.0)
        row.bias.fill_(1.0)
    x = torch.randn(2, 1, 4)
    torch.testing.assert_close(col(x), F.linear(x, col.weight))
    torch.testing.assert_close(row(x.new_ones(2, 1, 6)), F.linear(x.new_ones(2, 1, 6), row.weight))
    assert row.bias.sequence_parallel_grad


def test_invalid_layer_combinations_raise():
    with pytest.raises(ValueError, match="gather_output"):
        mpu.ColumnParallelLinear(4, 4, tp_group=None, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="input_is_parallel"):
        mpu.RowParallelLinear(4, 4, tp_group=None, input_is_parallel=False, sequence_parallel=True)


def test_init_uses_default_generator_and_init_method():
    torch.manual_seed(3)
    col = mpu.ColumnParallelLinear(4, 6, tp_group=None, init_method=nn.init.xavier_uniform_,
                                   params_dtype=torch.bfloat16)
    torch.manual_seed(3)
    master = nn.init.xavier_uniform_(torch.empty(6, 4))
    assert col.weight.dtype == torch.bfloat16
    torch.testing.assert_close(col.weight, master.to(torch.bfloat16), rtol=0, atol=0)


def test_vocab_parallel_embedding_equals_nn_embedding():
    torch.manual_seed(0)
    emb = mpu.VocabParallelEmbedding(11, 4, tp_group=None)
    tokens = torch.randint(0, 11, (3, 2))
    torch.testing.assert_close(emb(tokens), emb.weight[tokens], rtol=0, atol=0)
    assert emb.weight.tensor_model_parallel and emb.weight.partition_dim == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_torch(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(4, 3, 13) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, 13, (4, 3))
    loss = mpu.vocab_parallel_cross_entropy(logits, target, None)
    assert loss.dtype == torch.float32 and loss.shape == (4, 3)
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 13), target.view(-1), reduction="none").view(4, 3)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.rand(4, 3)
    (loss * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=tol, atol=tol)


def test_cross_entropy_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must agree"):
        mpu.vocab_parallel_cross_entropy(torch.randn(2, 3, 5), torch.zeros(3, 2, dtype=torch.long), None)


def test_rng_tracker_fork_is_a_separate_stream():
    tracker = mpu.RNGStatesTracker()
    tracker.add("stream", 99)
    with pytest.raises(ValueError):
        tracker.add("stream", 100)
    with pytest.raises(ValueError):
        tracker.add("other", 99)
    with pytest.raises(KeyError, match="model_parallel_seed"):
        with tracker.fork("missing"):
            pass
    torch.manual_seed(1)
    with tracker.fork("stream"):
        first = torch.rand(3)
    default_after = torch.rand(3)
    with tracker.fork("stream"):
        second = torch.rand(3)
    torch.manual_seed(99)
    torch.testing.assert_close(torch.cat([first, second]), torch.rand(6), rtol=0, atol=0)
    torch.manual_seed(1)
    torch.testing.assert_close(default_after, torch.rand(3), rtol=0, atol=0)
    saved = tracker.get_states()
    with tracker.fork("stream"):
        third = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("stream"):
        torch.testing.assert_close(torch.rand(3), third, rtol=0, atol=0)


def _dropout_block(x, weight):
    """Dropout on the default stream and on the model-parallel stream, around a matmul."""
    h = F.dropout(x @ weight, p=0.5, training=True)
    with mpu.get_rng_tracker().fork():
        h = F.dropout(torch.tanh(h), p=0.3, training=True)
    return h @ weight.t()


def test_checkpoint_replays_both_rng_streams():
    state = mpu.ParallelState.single()
    x0, w0 = torch.randn(6, 4), torch.randn(4, 4)

    def run(use_checkpoint):
        mpu.model_parallel_seed(123, state)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        outs = []
        for _ in range(2):  # two blocks: the second must see the streams advanced by the first
            out = mpu.checkpoint(_dropout_block, x, w) if use_checkpoint else _dropout_block(x, w)
            outs.append(out)
        total = sum(o.pow(2).sum() for o in outs)
        total.backward()
        with mpu.get_rng_tracker().fork():
            tracker_next = torch.rand(2)
        return [o.detach() for o in outs], x.grad, w.grad, torch.rand(2), tracker_next

    plain, ckpt = run(False), run(True)
    assert not torch.equal(plain[0][0], plain[0][1]), "the two blocks must draw different masks"
    for a, b in zip(plain[0], ckpt[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ckpt[1], plain[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ckpt[2], plain[2], rtol=1e-6, atol=1e-6)
    # After forward+recompute+backward both streams are where an uncheckpointed run leaves them.
    torch.testing.assert_close(ckpt[3], plain[3], rtol=0, atol=0)
    torch.testing.assert_close(ckpt[4], plain[4], rtol=0, atol=0)


def test_checkpoint_accepts_inputs_without_grad_and_tuple_outputs():
    w = torch.randn(3, 3, requires_grad=True)
    a, b = mpu.checkpoint(lambda x: (x @ w, x.sum()), torch.randn(2, 3))
    (a.sum() + b).backward()
    assert w.grad is not None


def test_sequence_parallel_grads_noop_in_one_process():
    p = nn.Parameter(torch.ones(2))
    mpu.mark_sequence_parallel_param(p)
    module = nn.Module()
    module.p = p
    p.grad = torch.ones(2)
    assert mpu.allreduce_sequence_parallel_grads(module, mpu.ParallelState.single(sequence_parallel=True)) == 0
    assert mpu.register_sequence_parallel_grad_hooks(module, mpu.ParallelState.single(sequence_parallel=True)) == 0
    assert grads.sequence_parallel_params(module) == [p]
    torch.testing.assert_close(p.grad, torch.ones(2))
