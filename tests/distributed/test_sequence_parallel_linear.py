"""`linear_with_sequence_parallel_gather` (the SP path of ColumnParallelLinear) on 2 gloo ranks equals
nn.Linear on the full sequence: output, input gradient (reduce-scattered), weight and bias gradients,
with and without bias, with a frozen weight or an input that needs no gradient; it saves only the local
input shard; and the mappings give the same results through the gloo fallback primitives (the path taken
by older torch versions whose gloo lacks the single-tensor collectives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mpu_checks
from megatron import mpu
from megatron.mpu import mappings
from megatron.mpu.sequence_parallel_linear import linear_with_sequence_parallel_gather
from mpu_checks import _leaf, assert_rel_close
from tests.helpers.distributed import run_distributed


def _check_linear(state, bias: bool, weight_grad: bool, input_grad: bool) -> None:
    g, p, r = state.tp_group, state.tp_size, state.tp_rank
    s, b, h, out = 4 * p, 3, 8, 6 * p
    tag = f"[tp={p} bias={bias} weight_grad={weight_grad} input_grad={input_grad}]"
    torch.manual_seed(51)
    X, W, Bias = torch.randn(s, b, h), torch.randn(out, h), torch.randn(out)
    G = torch.randn(s, b, out)  # upstream gradient of the full output; rank r holds columns chunk r

    x_ref, w_ref, b_ref = _leaf(X), _leaf(W), _leaf(Bias)
    y_ref = F.linear(x_ref, w_ref, b_ref if bias else None)
    (y_ref * G).sum().backward()

    x = X.chunk(p, 0)[r].clone().requires_grad_(input_grad)
    w = W.chunk(p, 0)[r].clone().requires_grad_(weight_grad)
    bb = Bias.chunk(p, 0)[r].clone().requires_grad_(True) if bias else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = linear_with_sequence_parallel_gather(x, w, bb, g)                 # [s, b, out/p]
    assert_rel_close(y, y_ref.detach().chunk(p, -1)[r], f"output {tag}")
    if input_grad or weight_grad or bias:
        (y * G.chunk(p, -1)[r]).sum().backward()
    assert all(t.shape[0] != s or t.dim() < 3 for t in saved), f"a gathered [s, b, h] was saved {tag}"
    assert any(t is x for t in saved), f"the local input shard is not what was saved {tag}"
    if input_grad:
        assert_rel_close(x.grad, x_ref.grad.chunk(p, 0)[r], f"input grad (reduce-scattered) {tag}")
    else:
        assert x.grad is None
    if weight_grad:
        assert_rel_close(w.grad, w_ref.grad.chunk(p, 0)[r], f"weight grad {tag}")
    else:
        assert w.grad is None
    if bias:
        assert_rel_close(bb.grad, b_ref.grad.chunk(p, 0)[r], f"bias grad {tag}")


def _check_column_parallel_sp_layer(state) -> None:
    """ColumnParallelLinear(sequence_parallel=True) == nn.Linear, skip_bias_add too."""
    g, p, r = state.tp_group, state.tp_size, state.tp_rank
    s, b, h, out = 2 * p, 2, 8, 4 * p
    for skip_bias_add in (False, True):
        torch.manual_seed(61)
        col = mpu.ColumnParallelLinear(h, out, tp_group=g, sequence_parallel=True, skip_bias_add=skip_bias_add)
        ref = torch.nn.Linear(h, out)
        torch.manual_seed(61)  # the same master draw as the layer's
        with torch.no_grad():
            mpu.default_init_method(ref.weight)
            ref.bias.copy_(torch.randn(out))
            col.bias.copy_(ref.bias.chunk(p)[r])
        X, G = torch.randn(s, b, h), torch.randn(s, b, out)
        x_ref = _leaf(X)
        y_ref = F.linear(x_ref, ref.weight, None if skip_bias_add else ref.bias)
        (y_ref * G).sum().backward()
        x = _leaf(X.chunk(p, 0)[r])
        y = col(x)
        if skip_bias_add:
            y = y + col.bias
            y_ref = y_ref + ref.bias
        tag = f"[tp={p} skip_bias_add={skip_bias_add}]"
        assert_rel_close(y, y_ref.detach().chunk(p, -1)[r], f"column SP output {tag}")
        (y * G.chunk(p, -1)[r]).sum().backward()
        assert_rel_close(x.grad, x_ref.grad.chunk(p, 0)[r], f"column SP input grad {tag}")
        assert_rel_close(col.weight.grad, ref.weight.grad.chunk(p, 0)[r], f"column SP weight grad {tag}")


def _check_gloo_fallback(state) -> None:
    """Force the gloo fallback primitives and re-run the mapping checks; restore after."""
    before = set(mappings._GLOO_WITHOUT_SINGLE_OP)
    mappings._GLOO_WITHOUT_SINGLE_OP.update({"all_gather", "reduce_scatter"})
    try:
        for seq_dim in (0, 1):
            mpu_checks.check_mappings(state, seq_dim)
        _check_linear(state, bias=True, weight_grad=True, input_grad=True)
    finally:
        mappings._GLOO_WITHOUT_SINGLE_OP.clear()
        mappings._GLOO_WITHOUT_SINGLE_OP.update(before)


def _world2(rank, world_size):
    state = mpu.initialize_model_parallel(2, sequence_parallel=True)
    for bias in (True, False):
        for weight_grad, input_grad in ((True, True), (False, True), (True, False)):
            _check_linear(state, bias, weight_grad, input_grad)
    _check_column_parallel_sp_layer(state)
    _check_gloo_fallback(state)
    assert not mappings._GLOO_WITHOUT_SINGLE_OP, "this torch's gloo has the single-tensor collectives"
    return "ok"


def test_linear_with_sequence_parallel_gather_2_ranks():
    assert run_distributed(_world2, 2) == ["ok"] * 2
