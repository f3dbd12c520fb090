"""`mlp_impl: quack` on a GPU (`python -m pytest -m gpu tests/gpu/test_gpu_fused_mlp.py -q`).

- quack's two kernels (`neox::gelu_fc1`, `neox::dgelu_fc2_dgrad`, megatron/model/fused_mlp.py) against the
  same math in fp32 torch on the same bf16 inputs, exact and tanh GELU, with and without fc1's bias, and
  autotuned (`mlp_autotune`);
- ParallelMLP on quack against the torch layer in bf16 (output and every gradient), eager, compiled, and
  compiled with autotuning (which then runs inside the backward pass);
- the SwiGLU kernels (gate and up read as one concatenated weight, the preactivation interleaved) against the
  same fp32 math, and the SwiGLU layer against the torch layer;
- the same inputs give the same results bit for bit (an exact resume);
- the memory autograd keeps at the end of a forward: one [s, b, ffn] bf16 tensor less than the torch layer
  (SwiGLU: two).

They need quack-kernels and the CuTe DSL (../shared/gpu/make-cute-wheels.sh); without them they fail with
the install hint rather than pass silently.
"""

import gc

import pytest
import torch

from megatron.model.fused_mlp import (_dgrad_reference, _dswiglu_reference, _fc1_reference, _swiglu_fc1_grads_reference,
                                      _swiglu_fc1_reference)
from megatron.model.mlp import ParallelMLP
from megatron.model.mlp_support import import_quack
from megatron.mpu.initialize import ParallelState
from megatron.neox_args.sections import DerivedArgs, ModelArgs

pytestmark = pytest.mark.gpu

BF16 = 1e-2  # relative (norm) error of a bf16 result against fp32 math on the same inputs


@pytest.fixture(autouse=True)
def _cuda_and_quack():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them with -m gpu on the GPU machine)")
    if import_quack() is None:
        pytest.fail("quack does not import: install the quack-kernels wheels (make-cute-wheels.sh / "
                    "install-cute.sh) and put CUTE_PATH on PYTHONPATH")
    torch.manual_seed(0)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("approximate, bias, tuned", [("none", True, False), ("none", False, False),
                                                     ("tanh", True, False), ("tanh", False, False),
                                                     ("none", True, True)],
                         ids=["erf-bias", "erf", "tanh-bias", "tanh", "erf-bias-tuned"])
def test_quack_kernels_equal_fp32_math(approximate, bias, tuned):
    t, h, f = 4096, 1024, 4096  # 410M's layer at 2 x 2048 tokens
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x, dy = torch.randn(t, h, **dev), torch.randn(t, h, **dev)
    w1, w2 = torch.randn(f, h, **dev) / h ** 0.5, torch.randn(h, f, **dev) / f ** 0.5
    b1 = torch.randn(f, **dev) if bias else None
    preact, postact = torch.ops.neox.gelu_fc1(x, w1, b1, approximate, tuned)
    want_p, want_z = _fc1_reference(x, w1, b1, approximate)
    assert preact.dtype == postact.dtype == torch.bfloat16
    assert _rel(preact, want_p) < BF16 and _rel(postact, want_z) < BF16
    dp, z, db1 = torch.ops.neox.dgelu_fc2_dgrad(dy, w2, want_p, approximate, bias, tuned)
    want_dp, want_z2, want_db1 = _dgrad_reference(dy, w2, want_p, approximate, bias)
    assert _rel(dp, want_dp) < BF16 and _rel(z, want_z2) < BF16
    if bias:
        assert db1.shape == (f,) and _rel(db1, want_db1) < BF16
    else:
        assert db1.numel() == 0


@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
def test_quack_swiglu_kernels_equal_fp32_math(tuned):
    t, h, f = 4096, 2048, 2048  # llama-1B's hidden size, a quarter of its MLP width
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x, dy = torch.randn(t, h, **dev), torch.randn(t, h, **dev)
    w_gate, w_up = torch.randn(f, h, **dev) / h ** 0.5, torch.randn(f, h, **dev) / h ** 0.5
    w2 = torch.randn(h, f, **dev) / f ** 0.5
    preact, postact = torch.ops.neox.swiglu_fc1(x, w_gate, w_up, tuned)
    want_p, want_z = _swiglu_fc1_reference(x, w_gate, w_up)
    assert preact.shape == (t, 2 * f) and postact.shape == (t, f)
    assert _rel(preact, want_p) < BF16 and _rel(postact, want_z) < BF16  # the interleaved layout included
    dp, z = torch.ops.neox.dswiglu_fc2_dgrad(dy, w2, want_p, tuned)
    want_dp, want_z2 = _dswiglu_reference(dy, w2, want_p)
    assert _rel(dp, want_dp) < BF16 and _rel(z, want_z2) < BF16
    dx, dw_cat = torch.ops.neox.swiglu_fc1_grads(want_dp, x, w_gate, w_up, tuned)
    want_dx, want_dw = _swiglu_fc1_grads_reference(want_dp, x, w_gate, w_up)
    assert dw_cat.shape == (2 * f, h) and _rel(dx, want_dx) < BF16 and _rel(dw_cat, want_dw) < BF16


SWIGLU = dict(activation="swiglu", use_bias_in_mlp=False)


def _layers(autotune=False, **keys):
    fields = dict(num_layers=1, hidden_size=1024, num_attention_heads=16, seq_length=2048, pos_emb="rotary")
    fields.update(keys)
    derived = DerivedArgs(num_kv_heads=16, intermediate_size=4096, max_position_embeddings=2048, vocab_size=128,
                          padded_vocab_size=128)
    torch.manual_seed(5)
    ours = ParallelMLP(ModelArgs(**fields), derived, ParallelState.single(), dtype=torch.bfloat16).cuda()
    fused = ParallelMLP(ModelArgs(mlp_impl="quack", mlp_autotune=autotune, **fields), derived, ParallelState.single(),
                        dtype=torch.bfloat16).cuda()
    fused.load_state_dict(ours.state_dict())
    return ours, fused


def _run(layer, x, dy):
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.backward(dy)
    module = getattr(layer, "_orig_mod", layer)  # torch.compile's wrapper prefixes the parameter names
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return y.detach(), xi.grad, grads


@pytest.mark.parametrize("compiled, autotune, keys", [(False, False, {}), (True, False, {}), (True, True, {}),
                                                    (False, False, SWIGLU), (True, False, SWIGLU)],
                         ids=["gelu", "gelu-compiled", "gelu-compiled-tuned", "swiglu", "swiglu-compiled"])
def test_parallel_mlp_on_quack_equals_the_torch_layer(compiled, autotune, keys):
    ours, fused = _layers(autotune, **keys)
    x = torch.randn(2048, 2, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    y, dx, grads = _run(ours, x, dy)
    run = torch.compile(fused) if compiled else fused
    y_f, dx_f, grads_f = _run(run, x, dy)
    _run(run, x, dy)  # a second call: the cached kernels (and, compiled, the graph) again
    assert _rel(y_f, y) < BF16 and _rel(dx_f, dx) < BF16
    for name, grad in grads.items():
        assert _rel(grads_f[name], grad) < BF16, name


@pytest.mark.parametrize("keys, fewer", [({}, 1), (SWIGLU, 2)], ids=["gelu", "swiglu"])
def test_the_fused_layer_keeps_less(keys, fewer):
    """GELU: one [s, b, ffn] tensor less than the eager torch layer (fc1's output, not the GELU's too);
    SwiGLU: two (gate and up, not silu(gate) and the product too)."""
    ours, fused = _layers(**keys)
    x = torch.randn(2048, 2, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    held = {}
    for name, layer in (("torch", ours), ("quack", fused)):
        layer(x).sum().backward()  # warm-up: kernels compiled, workspaces and gradients allocated
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = layer(x)
        torch.cuda.synchronize()
        held[name] = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        del y
    ffn_wide = 2048 * 2 * 4096 * 2  # bytes of one [s, b, ffn] bf16 tensor
    assert held["torch"] - held["quack"] == pytest.approx(fewer * ffn_wide, rel=0.05), held


@pytest.mark.parametrize("keys, autotune", [({}, False), (SWIGLU, False), ({}, True)],
                         ids=["gelu", "swiglu", "gelu-tuned"])
def test_the_fused_layer_is_deterministic(keys, autotune):
    """The same inputs give the same output and gradients bit for bit (the bias gradient's partial sums are
    folded in tile order; autotuned, the winner is kept for the process): what an exact resume needs."""
    _, fused = _layers(autotune, **keys)
    x = torch.randn(2048, 2, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    first, second = _run(fused, x, dy), _run(fused, x, dy)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name, grad in first[2].items():
        assert torch.equal(second[2][name], grad), name
