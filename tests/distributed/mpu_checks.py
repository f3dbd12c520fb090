"""Checks of megatron.mpu run inside spawned gloo processes (see test_mpu_distributed.py).

Each `check_*` takes a `ParallelState` and compares the tensor-parallel result on this rank with a
single-process reference computed on every rank from the same seed. Tolerances: forward and
gradients within 1e-5 relative to the reference's largest magnitude (fp32); pure data movement
(split / gather) must be exact.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron import mpu
from megatron.mpu import mappings
from megatron.mpu.grads import REDUCTION_COUNTER

REL_TOL = 1e-5


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = REL_TOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual, expected), f"{what}: not bit-identical"


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# mappings
# ------------------------------------------------------------------------------------------------

def check_mappings(state, seq_dim: int) -> None:
    """Forward and backward of every paired collective, [s, b, h] (seq_dim 0) or [b, s, h] (seq_dim 1)."""
    g, p, r = state.tp_group, state.tp_size, state.tp_rank
    torch.manual_seed(100 + seq_dim)
    s, b, h = 2 * p, 3, 4 * p
    shape = (s, b, h) if seq_dim == 0 else (b, s, h)
    X = torch.randn(shape)
    G = torch.randn(shape)               # a replicated upstream gradient
    G_per_rank = torch.randn((p,) + shape)  # rank q's partial quantity is G_per_rank[q]
    G_sum = G_per_rank.sum(0)
    tag = f"[tp={p} seq_dim={seq_dim}]"

    x = _leaf(X)
    y = mpu.copy_to_tensor_parallel_region(x, g)
    assert_exact(y, X, f"copy_to fwd {tag}")
    y.backward(G_per_rank[r])
    assert_rel_close(x.grad, G_sum, f"copy_to bwd (all-reduce) {tag}", 1e-6)

    x = _leaf(G_per_rank[r])
    y = mpu.reduce_from_tensor_parallel_region(x, g)
    assert_rel_close(y, G_sum, f"reduce_from fwd (all-reduce) {tag}", 1e-6)
    y.backward(G)
    assert_exact(x.grad, G, f"reduce_from bwd (identity) {tag}")

    x = _leaf(X)
    y = mpu.scatter_to_tensor_parallel_region(x, g)
    assert_exact(y, X.chunk(p, -1)[r], f"scatter_to_tp fwd {tag}")
    y.backward(G.chunk(p, -1)[r])
    assert_exact(x.grad, G, f"scatter_to_tp bwd (all-gather) {tag}")

    x = _leaf(X.chunk(p, -1)[r])
    y = mpu.gather_from_tensor_parallel_region(x, g)
    assert_exact(y, X, f"gather_from_tp fwd {tag}")
    y.backward(G)
    assert_exact(x.grad, G.chunk(p, -1)[r], f"gather_from_tp bwd (split) {tag}")

    x = _leaf(X)
    y = mpu.scatter_to_sequence_parallel_region(x, g, seq_dim=seq_dim)
    assert_exact(y, X.chunk(p, seq_dim)[r], f"scatter_to_seq fwd {tag}")
    y.backward(G.chunk(p, seq_dim)[r])
    assert_exact(x.grad, G, f"scatter_to_seq bwd (all-gather) {tag}")

    x = _leaf(X.chunk(p, seq_dim)[r])
    y = mpu.gather_from_sequence_parallel_region(x, g, seq_dim=seq_dim)
    assert_exact(y, X, f"gather_from_seq fwd {tag}")
    y.backward(G_per_rank[r])
    assert_rel_close(x.grad, G_sum.chunk(p, seq_dim)[r], f"gather_from_seq bwd (reduce-scatter) {tag}", 1e-6)

    x = _leaf(X.chunk(p, seq_dim)[r])
    y = mpu.gather_from_sequence_parallel_region(x, g, seq_dim=seq_dim, tensor_parallel_output_grad=False)
    assert_exact(y, X, f"gather_from_seq(split bwd) fwd {tag}")
    y.backward(G)
    assert_exact(x.grad, G.chunk(p, seq_dim)[r], f"gather_from_seq bwd (split) {tag}")

    x = _leaf(G_per_rank[r])
    y = mpu.reduce_scatter_to_sequence_parallel_region(x, g, seq_dim=seq_dim)
    assert_rel_close(y, G_sum.chunk(p, seq_dim)[r], f"reduce_scatter_to_seq fwd {tag}", 1e-6)
    y.backward(G.chunk(p, seq_dim)[r])
    assert_exact(x.grad, G, f"reduce_scatter_to_seq bwd (all-gather) {tag}")


def check_sequence_length_errors(state) -> None:
    """A sequence length not divisible by tp raises a clear ValueError before any collective."""
    p, g = state.tp_size, state.tp_group
    bad = torch.randn(2 * p + 1, 2, 4)
    for fn in (mpu.scatter_to_sequence_parallel_region, mpu.reduce_scatter_to_sequence_parallel_region):
        try:
            fn(bad, g, seq_dim=0)
        except ValueError as exc:
            assert "not divisible by the tensor-parallel size" in str(exc), str(exc)
        else:
            raise AssertionError(f"{fn.__name__} accepted a sequence of {2 * p + 1} with tp={p}")
    try:
        mpu.scatter_to_sequence_parallel_region(bad.transpose(0, 1), g, seq_dim=1)
    except ValueError:
        pass
    else:
        raise AssertionError("seq_dim=1 split accepted a non-divisible sequence")


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------

def check_init_independent_of_tp(state) -> None:
    """TP shards, gathered, equal the TP=1 weights built from the same seed (bit-identical)."""
    g = state.tp_group
    torch.manual_seed(7)
    col = mpu.ColumnParallelLinear(6, 4 * state.tp_size, tp_group=g)
    row = mpu.RowParallelLinear(4 * state.tp_size, 6, tp_group=g)
    emb = mpu.VocabParallelEmbedding(4 * state.tp_size, 5, tp_group=g)
    torch.manual_seed(7)
    col1 = mpu.ColumnParallelLinear(6, 4 * state.tp_size, tp_group=None)
    row1 = mpu.RowParallelLinear(4 * state.tp_size, 6, tp_group=None)
    emb1 = mpu.VocabParallelEmbedding(4 * state.tp_size, 5, tp_group=None)
    assert_exact(mappings.gather_along_dim(col.weight.data, 0, g), col1.weight.data, "column init")
    assert_exact(mappings.gather_along_dim(row.weight.data, 1, g), row1.weight.data, "row init")
    assert_exact(mappings.gather_along_dim(emb.weight.data, 0, g), emb1.weight.data, "embedding init")
    for param, dim in ((col.weight, 0), (col.bias, 0), (row.weight, 1), (emb.weight, 0)):
        assert param.tensor_model_parallel is True and param.partition_dim == dim and param.partition_stride == 1
    assert not getattr(row.bias, "tensor_model_parallel", False)


def check_mlp_block(state, sequence_parallel: bool) -> None:
    """ColumnParallelLinear -> gelu -> RowParallelLinear equals nn.Linear -> gelu -> nn.Linear."""
    state = dataclasses.replace(state, sequence_parallel=sequence_parallel)
    g, p, r = state.tp_group, state.tp_size, state.tp_rank
    s, b, h, ffn = 2 * p, 2, 8, 32
    tag = f"[tp={p} sp={sequence_parallel}]"

    torch.manual_seed(11)
    col = mpu.ColumnParallelLinear(h, ffn, tp_group=g, sequence_parallel=sequence_parallel)
    row = mpu.RowParallelLinear(ffn, h, tp_group=g, sequence_parallel=sequence_parallel)
    ref1, ref2 = nn.Linear(h, ffn), nn.Linear(ffn, h)
    torch.manual_seed(11)
    with torch.no_grad():  # same master draws as the layers: column master first, then row master
        mpu.default_init_method(ref1.weight)
        mpu.default_init_method(ref2.weight)
        ref1.bias.copy_(torch.randn(ffn))
        ref2.bias.copy_(torch.randn(h))
        col.bias.copy_(ref1.bias.chunk(p)[r])
        row.bias.copy_(ref2.bias)
    assert row.bias is not None and getattr(row.bias, "sequence_parallel_grad", False) == sequence_parallel

    X, G = torch.randn(s, b, h), torch.randn(s, b, h)
    x_ref = _leaf(X)
    out_ref = ref2(F.gelu(ref1(x_ref)))                                   # [s, b, h]
    (out_ref * G).sum().backward()

    if sequence_parallel:
        x = _leaf(X.chunk(p, 0)[r])                                       # [s/p, b, h]
        out = row(F.gelu(col(x)))                                         # [s/p, b, h]
        assert out.shape == (s // p, b, h)
        (out * G.chunk(p, 0)[r]).sum().backward()
        module = nn.ModuleList([col, row])
        assert mpu.allreduce_sequence_parallel_grads(module, state) == 1
        assert getattr(row.bias, REDUCTION_COUNTER) == 1
        assert_rel_close(out, out_ref.chunk(p, 0)[r], f"mlp output {tag}")
        assert_rel_close(x.grad, x_ref.grad.chunk(p, 0)[r], f"mlp input grad {tag}")
    else:
        x = _leaf(X)
        out = row(F.gelu(col(x)))                                         # [s, b, h]
        (out * G).sum().backward()
        assert_rel_close(out, out_ref, f"mlp output {tag}")
        assert_rel_close(x.grad, x_ref.grad, f"mlp input grad {tag}")
    assert_rel_close(mappings.gather_along_dim(col.weight.grad, 0, g), ref1.weight.grad, f"column weight grad {tag}")
    assert_rel_close(mappings.gather_along_dim(col.bias.grad, 0, g), ref1.bias.grad, f"column bias grad {tag}")
    assert_rel_close(mappings.gather_along_dim(row.weight.grad, 1, g), ref2.weight.grad, f"row weight grad {tag}")
    assert_rel_close(row.bias.grad, ref2.bias.grad, f"row bias grad {tag}")


def check_vocab_parallel_embedding(state, sequence_parallel: bool) -> None:
    """Masked lookup + all-reduce (or reduce-scatter along s under SP) equals nn.Embedding."""
    g, p, r = state.tp_group, state.tp_size, state.tp_rank
    vocab, h, s, b = 4 * p, 6, 2 * p, 3
    tag = f"[tp={p} sp={sequence_parallel}]"
    torch.manual_seed(21)
    emb = mpu.VocabParallelEmbedding(vocab, h, tp_group=g, sequence_parallel=sequence_parallel)
    ref = nn.Embedding(vocab, h)
    torch.manual_seed(21)
    with torch.no_grad():
        mpu.default_init_method(ref.weight)
    tokens = torch.arange(s * b).remainder(vocab).view(s, b)[torch.randperm(s)]  # every id, shuffled
    G = torch.randn(s, b, h)
    out_ref = ref(tokens)
    (out_ref * G).sum().backward()
    out = emb(tokens)
    if sequence_parallel:
        assert_rel_close(out, out_ref.chunk(p, 0)[r], f"embedding output {tag}")
        (out * G.chunk(p, 0)[r]).sum().backward()
    else:
        assert_rel_close(out, out_ref, f"embedding output {tag}")
        (out * G).sum().backward()
    assert_rel_close(emb.weight.grad, ref.weight.grad.chunk(p, 0)[r], f"embedding grad shard {tag}")
    assert_rel_close(mappings.gather_along_dim(emb.weight.grad, 0, g), ref.weight.grad, f"embedding grad {tag}")


def check_cross_entropy(state) -> None:
    """Loss and logits gradient equal F.cross_entropy on the full logits, also for huge logits."""
    g, p, r = state.tp_group, state.tp_size, state.tp_rank
    s, b, vocab = 5, 3, 8 * p
    torch.manual_seed(31)
    for shift in (0.0, 1000.0):
        L = torch.randn(s, b, vocab) * 3 + shift
        target = torch.randint(0, vocab, (s, b))
        weights = torch.rand(s, b)
        logits_ref = _leaf(L)
        loss_ref = F.cross_entropy(logits_ref.view(-1, vocab), target.view(-1), reduction="none").view(s, b)
        (loss_ref * weights).sum().backward()
        logits = _leaf(L.chunk(p, -1)[r])
        loss = mpu.vocab_parallel_cross_entropy(logits, target, g)
        (loss * weights).sum().backward()
        tag = f"[tp={p} shift={shift}]"
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
        assert_rel_close(loss, loss_ref, f"cross entropy loss {tag}")
        assert_rel_close(logits.grad, logits_ref.grad.chunk(p, -1)[r], f"cross entropy grad {tag}")


# ------------------------------------------------------------------------------------------------
# sequence-parallel gradients, RNG
# ------------------------------------------------------------------------------------------------

class _TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.marked = nn.Parameter(torch.zeros(3))
        self.plain = nn.Parameter(torch.zeros(3))
        mpu.mark_sequence_parallel_param(self.marked)

    def forward(self, c):
        return (self.marked * c).sum() + (self.plain * c).sum()


def check_sequence_parallel_grads(state) -> None:
    """Marked grads are summed over the tensor group exactly once; with two micro-batches of
    gradient accumulation the once-per-step function and the hooks give the same gradient."""
    sp_state = dataclasses.replace(state, sequence_parallel=True)
    p, r = state.tp_size, state.tp_rank
    torch.manual_seed(41)
    contributions = torch.randn(p, 2, 3)            # [tp rank, micro-batch, 3]
    expected_marked = contributions.sum((0, 1))     # summed over ranks and micro-batches
    expected_plain = contributions[r].sum(0)        # local only

    once = _TwoParams()
    for k in range(2):
        once(contributions[r, k]).backward()
    assert mpu.allreduce_sequence_parallel_grads(once, state) == 0, "no-op without sequence parallelism"
    assert_exact(once.marked.grad, expected_plain, "untouched without SP")
    assert mpu.allreduce_sequence_parallel_grads(once, sp_state) == 1
    assert_rel_close(once.marked.grad, expected_marked, "once-per-step marked grad", 1e-6)
    assert_exact(once.plain.grad, expected_plain, "unmarked grad")
    assert getattr(once.marked, REDUCTION_COUNTER) == 1
    assert not hasattr(once.plain, REDUCTION_COUNTER)

    hooked = _TwoParams()
    wrapper = nn.ModuleList([hooked, hooked])       # the same parameters reached twice
    assert mpu.register_sequence_parallel_grad_hooks(wrapper, sp_state) == 1
    assert mpu.register_sequence_parallel_grad_hooks(hooked, sp_state) == 0, "hooked twice"
    for k in range(2):
        hooked(contributions[r, k]).backward()
    assert getattr(hooked.marked, REDUCTION_COUNTER) == 2, "one sum per micro-batch"
    assert_rel_close(hooked.marked.grad, expected_marked, "hooked marked grad", 1e-6)
    assert_exact(hooked.plain.grad, expected_plain, "hooked unmarked grad")
    try:
        mpu.allreduce_sequence_parallel_grads(hooked, sp_state)
    except RuntimeError:
        pass
    else:
        raise AssertionError("mixing hooks and the once-per-step sum must be refused")


def check_rng(state) -> None:
    """Default RNG identical across tensor ranks; model-parallel fork different, seeded seed+2718+tp_rank."""
    g, p, r = state.tp_group, state.tp_size, state.tp_rank
    mpu.model_parallel_seed(5, state)
    default_draw = torch.rand(4)
    with mpu.get_rng_tracker().fork():
        forked_draw = torch.rand(4)
    after_fork = torch.rand(4)
    torch.manual_seed(5)
    assert_exact(default_draw, torch.rand(4), "default stream seeded with seed")
    assert_exact(after_fork, torch.rand(4), "fork leaves the default stream untouched")
    torch.manual_seed(5 + 2718 + r)
    assert_exact(forked_draw, torch.rand(4), "fork seeded with seed + 2718 + tp_rank")
    gathered = mappings.gather_along_dim(torch.stack([default_draw, forked_draw]), 0, g).view(p, 2, 4)
    assert all(torch.equal(gathered[q, 0], gathered[0, 0]) for q in range(p))
    assert all(not torch.equal(gathered[q, 1], gathered[0, 1]) for q in range(1, p))


def run_all_tensor_parallel_checks(state) -> None:
    for seq_dim in (0, 1):
        check_mappings(state, seq_dim)
    check_sequence_length_errors(state)
    check_init_independent_of_tp(state)
    for sequence_parallel in (False, True):
        check_mlp_block(state, sequence_parallel)
        check_vocab_parallel_embedding(state, sequence_parallel)
    check_cross_entropy(state)
    check_sequence_parallel_grads(state)
    check_rng(state)


# ------------------------------------------------------------------------------------------------
# topology and the DeepSpeed adapter
# ------------------------------------------------------------------------------------------------

def _group_sum(value: int, group) -> int:
    t = torch.tensor([float(value)])
    dist.all_reduce(t, group=group)
    return int(t.item())


def check_topology_matches_deepspeed(rank: int, world_size: int, tp: int, pp: int) -> None:
    """Coordinates and group members equal DeepSpeed's PipeModelDataParallelTopology's."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    state = mpu.initialize_model_parallel(tp, pp)
    dp = world_size // (tp * pp)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    coord = topo.get_coord(rank)
    assert (state.pp_rank, state.dp_rank, state.tp_rank) == (coord.pipe, coord.data, coord.model)
    assert (state.tp_size, state.pp_size, state.dp_size) == (tp, pp, dp)

    def members(axis):
        return next(ranks for ranks in topo.get_axis_comm_lists(axis) if rank in ranks)

    assert state.tp_ranks == members("model"), (state.tp_ranks, members("model"))
    assert state.dp_ranks == members("data")
    assert state.pp_ranks == members("pipe")
    for group, ranks in ((state.tp_group, state.tp_ranks), (state.dp_group, state.dp_ranks),
                         (state.pp_group, state.pp_ranks), (state.model_group, state.model_ranks)):
        assert _group_sum(rank, group) == sum(ranks)


def check_world_size_error(world_size: int) -> None:
    try:
        mpu.initialize_model_parallel(3, 1)
    except ValueError as exc:
        message = str(exc)
        # every factor is named: the world size, tp, pp and the fractional dp it would need
        assert all(part in message for part in (f"world size {world_size}", "tensor-parallel 3",
                                                "pipeline-parallel 1", f"{world_size} / (3 x 1)")), message
    else:
        raise AssertionError("tp=3 accepted on a world of 4")


def check_deepspeed_adapter_tp2(rank: int) -> None:
    """On 4 ranks with tp=2 (dp=2): every answer DeepSpeed reads, and DeepSpeed's grad-norm code."""
    import deepspeed.comm
    from deepspeed.runtime.utils import clip_grad_norm_
    from deepspeed.utils.bwc import (bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_rank,
                                     bwc_tensor_model_parallel_world_size)

    state = mpu.initialize_model_parallel(2)
    ds_mpu = state.deepspeed_mpu()
    tp_rank, dp_rank = rank % 2, rank // 2
    assert ds_mpu.get_tensor_model_parallel_rank() == tp_rank
    assert ds_mpu.get_tensor_model_parallel_world_size() == 2
    assert ds_mpu.get_model_parallel_rank() == tp_rank
    assert ds_mpu.get_model_parallel_world_size() == 2
    assert ds_mpu.get_slice_parallel_rank() == tp_rank and ds_mpu.get_slice_parallel_world_size() == 2
    assert ds_mpu.get_tensor_model_parallel_src_rank() == rank - tp_rank
    assert ds_mpu.get_data_parallel_rank() == dp_rank
    assert ds_mpu.get_data_parallel_world_size() == 2
    assert ds_mpu.get_data_parallel_group_ranks() == [tp_rank, tp_rank + 2]
    assert ds_mpu.get_pipe_parallel_rank() == 0 and ds_mpu.get_pipe_parallel_world_size() == 1
    assert ds_mpu.get_pipeline_model_parallel_rank() == 0
    assert ds_mpu.get_pipeline_model_parallel_world_size() == 1
    assert not hasattr(ds_mpu, "get_sequence_parallel_world_size"), "would mean Ulysses SP to DeepSpeed"
    assert _group_sum(rank, ds_mpu.get_tensor_model_parallel_group()) == 2 * (rank - tp_rank) + 1
    assert _group_sum(rank, ds_mpu.get_model_parallel_group()) == 2 * (rank - tp_rank) + 1
    assert _group_sum(rank, ds_mpu.get_data_parallel_group()) == 2 * tp_rank + 2
    assert _group_sum(rank, ds_mpu.get_pipe_parallel_group()) == rank
    assert bwc_tensor_model_parallel_rank(ds_mpu) == tp_rank
    assert bwc_tensor_model_parallel_world_size(ds_mpu) == 2
    assert bwc_pipeline_parallel_world_size(ds_mpu) == 1

    # DeepSpeed's gradient clipping counts a sharded gradient on every tensor rank and a
    # replicated one once: the norm equals the single-process norm of the full gradients.
    deepspeed.comm.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(51)
    full_weight_grad, replicated_grad = torch.randn(8, 3), torch.randn(5)
    col = mpu.ColumnParallelLinear(3, 8, tp_group=state.tp_group, bias=False)
    replicated = nn.Parameter(torch.zeros(5))
    col.weight.grad = full_weight_grad.chunk(2, 0)[tp_rank].clone()
    replicated.grad = replicated_grad.clone()
    norm = clip_grad_norm_([col.weight, replicated], max_norm=1e9, mpu=ds_mpu)
    expected = torch.cat([full_weight_grad.flatten(), replicated_grad]).norm()
    assert_rel_close(torch.as_tensor(norm).reshape(()), expected, "DeepSpeed clip_grad_norm_ with our mpu")
