"""`mlp_impl: quack` (megatron/model/fused_mlp.py) on the CPU: its autograd functions (GELU and SwiGLU), run on
the custom ops' torch math, give the unfused MLP's output and every gradient; ParallelMLP wired to them equals
the torch layer, alone, in chunks and with tensor parallelism 2; it keeps one ffn-wide tensor less for
backward; a compiled layer calls it without a graph break; and asking for it where it cannot run is a
ConfigError. (The torch math follows quack's own layouts: the gated preactivation's columns interleave gate
and up, checked here against an explicit construction.)
(The quack kernels themselves run on a CUDA machine: tests/gpu/test_gpu_fused_mlp.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import megatron.model.mlp as mlp_module
from megatron.model.fused_mlp import gelu_mlp, interleave, swiglu_mlp
from megatron.model.mlp import ParallelMLP
from megatron.model.mlp_support import check_mlp_support
from megatron.mpu.initialize import ParallelState
from megatron.neox_args.errors import ConfigError
from model_test_utils import make_args
from tests.helpers.distributed import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; the fused path sums the same products in another order


def _unfused(x, w1, b1, w2, approximate):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2)


def _grads(fn, *tensors, dy):
    leaves = [t.detach().clone().requires_grad_(t is not None) if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_equals_the_unfused_mlp(approximate, bias):
    torch.manual_seed(0)
    s, b, h, f = 6, 2, 8, 24
    x, dy = torch.randn(s, b, h), torch.randn(s, b, h)
    w1, w2 = torch.randn(f, h) / h ** 0.5, torch.randn(h, f) / f ** 0.5
    b1 = torch.randn(f) if bias else None
    expected, expected_grads = _grads(lambda *t: _unfused(*t, approximate), x, w1, b1, w2, dy=dy)
    fused, fused_grads = _grads(lambda *t: gelu_mlp(*t, approximate), x, w1, b1, w2, dy=dy)
    torch.testing.assert_close(fused, expected, **TOL)
    for name, got, want in zip(("x", "w1", "b1", "w2"), fused_grads, expected_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **TOL, msg=name)
    erf, tanh = (gelu_mlp(x, w1, b1, w2, a) for a in ("none", "tanh"))
    assert not torch.allclose(erf, tanh, rtol=1e-6, atol=1e-6)  # the approximation reaches the kernel


def _unfused_swiglu(x, w_gate, w_up, w2):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w2)


def test_swiglu_mlp_equals_the_unfused_mlp():
    torch.manual_seed(0)
    s, b, h, f = 6, 2, 8, 24
    x, dy = torch.randn(s, b, h), torch.randn(s, b, h)
    w_gate, w_up, w2 = torch.randn(f, h) / h ** 0.5, torch.randn(f, h) / h ** 0.5, torch.randn(h, f) / f ** 0.5
    expected, expected_grads = _grads(_unfused_swiglu, x, w_gate, w_up, w2, dy=dy)
    fused, fused_grads = _grads(swiglu_mlp, x, w_gate, w_up, w2, dy=dy)
    torch.testing.assert_close(fused, expected, **TOL)
    for name, got, want in zip(("x", "w_gate", "w_up", "w2"), fused_grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL, msg=name)


def test_gated_preact_interleaves_gate_and_up():
    gate, up = torch.arange(6.0).view(2, 3), 10 + torch.arange(6.0).view(2, 3)
    assert interleave(gate, up).tolist() == [[0, 10, 1, 11, 2, 12], [3, 13, 4, 14, 5, 15]]
    x, w_gate, w_up = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, 5)
    preact, postact = torch.ops.neox.swiglu_fc1(x, w_gate, w_up, False)
    torch.testing.assert_close(preact[:, 0::2], x @ w_gate.t())  # gate at even columns, as quack's
    torch.testing.assert_close(preact[:, 1::2], x @ w_up.t())
    torch.testing.assert_close(postact, F.silu(x @ w_gate.t()) * (x @ w_up.t()))


SWIGLU = dict(activation="swiglu", use_bias_in_mlp=False)


def _mlp_pair(monkeypatch, **keys):
    """(torch layer, quack layer) with the same weights; the quack layer's device check is lifted so that it
    runs on the custom ops' CPU math."""
    monkeypatch.setattr(mlp_module, "check_mlp_support", lambda *a, **k: None)
    model_args, derived = make_args(**keys)
    torch.manual_seed(5)
    ours = ParallelMLP(model_args, derived, ParallelState.single())
    fused = ParallelMLP(make_args(mlp_impl="quack", **keys)[0], derived, ParallelState.single())
    fused.load_state_dict(ours.state_dict())
    return ours, fused


@pytest.mark.parametrize("keys", [{}, dict(mlp_chunk_size=4), dict(bias_gelu_fusion=True), SWIGLU,
                                  dict(mlp_chunk_size=4, **SWIGLU)],
                         ids=["whole", "chunked", "tanh", "swiglu", "swiglu-chunked"])
def test_parallel_mlp_on_quack_equals_the_torch_layer(monkeypatch, keys):
    ours, fused = _mlp_pair(monkeypatch, **keys)
    assert fused.fused and not ours.fused
    x = torch.randn(16, 2, 32)
    dy = torch.randn(16, 2, 32)
    outs = []
    for layer in (ours, fused):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    torch.testing.assert_close(outs[1][1], outs[0][1], **TOL)
    for name, grad in outs[0][2].items():
        torch.testing.assert_close(outs[1][2][name], grad, **TOL, msg=name)


@pytest.mark.parametrize("keys, kept", [({}, (2, 1)), (SWIGLU, (4, 2))], ids=["gelu", "swiglu"])
def test_the_fused_layer_keeps_fc1_output_only(monkeypatch, keys, kept):
    """Saved for backward, in [s, b, ffn] tensors: GELU, fc1's output (1) where the torch layer keeps two (fc1's
    and the GELU's output); SwiGLU, gate and up (one [s, b, 2 ffn] tensor) where it keeps four (gate, up,
    silu(gate), the product)."""
    ours, fused = _mlp_pair(monkeypatch, **keys)
    x = torch.randn(16, 3, 32, requires_grad=True)
    ffn_wide = 16 * 3 * 64  # (not the 64 x 32 weights' size)

    def count(layer):
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.numel()) and t, lambda t: t):
            layer(x)
        return sum(n // ffn_wide for n in saved.values() if n % ffn_wide == 0 and n >= ffn_wide)

    assert (count(ours), count(fused)) == kept


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_compiled_fused_mlp_has_no_graph_break(gated):
    torch.manual_seed(1)
    x, w1, w2, dy = torch.randn(8, 8), torch.randn(16, 8), torch.randn(8, 16), torch.randn(8, 8)
    second = torch.randn(16, 8) if gated else torch.randn(16)  # the up weight, or fc1's bias
    fused = swiglu_mlp if gated else (lambda *t: gelu_mlp(*t, "none"))
    unfused = _unfused_swiglu if gated else (lambda *t: _unfused(*t, "none"))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    got, got_grads = _grads(compiled, x, w1, second, w2, dy=dy)
    want, want_grads = _grads(unfused, x, w1, second, w2, dy=dy)
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL)


def _check_tp2_fused_mlp(rank, world_size, keys):
    from megatron.mpu.initialize import initialize_model_parallel

    mlp_module.check_mlp_support = lambda *a, **k: None  # this spawned process only
    state = initialize_model_parallel(tp_size=2)
    model_args, derived = make_args(**keys)
    torch.manual_seed(5)
    reference = ParallelMLP(model_args, derived, ParallelState.single())  # the init does not depend on tp
    torch.manual_seed(5)
    fused = ParallelMLP(make_args(mlp_impl="quack", **keys)[0], derived, state)
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(3))
    outs = []
    for layer in (reference, fused):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    torch.testing.assert_close(outs[1][1], outs[0][1], **TOL)
    half = slice(rank * 32, (rank + 1) * 32)  # this rank's shard of the 64 fc1 (gate) rows / fc2 columns
    for name in ("linear_fc1", "linear_gate"):
        if getattr(fused, name) is not None:
            torch.testing.assert_close(getattr(fused, name).weight.grad,
                                       getattr(reference, name).weight.grad[half], **TOL)
    torch.testing.assert_close(fused.linear_fc2.weight.grad, reference.linear_fc2.weight.grad[:, half], **TOL)
    if fused.linear_fc1.bias is not None:
        torch.testing.assert_close(fused.linear_fc1.bias.grad, reference.linear_fc1.bias.grad[half], **TOL)
        torch.testing.assert_close(fused.linear_fc2.bias.grad, reference.linear_fc2.bias.grad, **TOL)


@pytest.mark.parametrize("keys", [{}, SWIGLU], ids=["gelu", "swiglu"])
def test_tensor_parallel_fused_mlp_equals_single_process(keys):
    run_distributed(_check_tp2_fused_mlp, 2, keys)


def test_mlp_support_refuses_what_cannot_run():
    gelu, _ = make_args(mlp_impl="quack")
    for model, dtype, sp, device, match in [
            (make_args(mlp_impl="quack", activation="relu")[0], torch.bfloat16, False, "cuda", "activation"),
            (make_args(mlp_impl="quack", activation="swiglu")[0], torch.bfloat16, False, "cuda", "use_bias_in_mlp"),
            (gelu, torch.float32, False, "cuda", "bf16"),
            (gelu, torch.bfloat16, True, "cuda", "sequence_parallel"),
            (gelu, torch.bfloat16, False, "cpu", "CUDA GPUs only")]:
        with pytest.raises(ConfigError, match=match) as error:
            check_mlp_support(model, dtype, sequence_parallel=sp, device_type=device)
        assert "mlp_impl: torch" in str(error.value)
    with pytest.raises(ConfigError, match=r"multiples of 8.*mlp_impl: torch"):
        check_mlp_support(gelu, torch.bfloat16, sequence_parallel=False, device_type="cuda", width_per_rank=36)
    check_mlp_support(make_args()[0], torch.float32, sequence_parallel=True, device_type="cpu")  # torch: no check


def test_a_missing_quack_is_a_config_error_naming_the_package(monkeypatch):
    import megatron.model.mlp_support as support

    monkeypatch.setattr(support, "_IMPORT_ERROR", [])
    monkeypatch.setitem(__import__("sys").modules, "quack", None)  # `import quack` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'quack-kernels>=0.6.5'.*mlp_impl: torch") as error:
        check_mlp_support(make_args(mlp_impl="quack")[0], torch.bfloat16, sequence_parallel=False, device_type="cuda")
    assert "ModuleNotFoundError" in str(error.value)  # the reason it did not import


def test_a_quack_layer_on_this_cpu_is_a_config_error():
    model_args, derived = make_args(mlp_impl="quack")
    with pytest.raises(ConfigError, match="mlp_impl"):
        ParallelMLP(model_args, derived, ParallelState.single(), dtype=torch.bfloat16)


@pytest.mark.parametrize("keys, ffn", [({}, 1024), (SWIGLU, 768)], ids=["gelu", "swiglu"])
def test_memory_estimate_counts_what_a_fused_layer_saves(monkeypatch, keys, ffn):
    """Bytes of the unique storages one layer with the fused MLP saves (fp32, CPU, on the ops' torch math)
    against `layer_activation_elements(..., fused_mlp=True)`, the memory estimate's term."""
    from megatron.neox_args.sections import DerivedArgs, ModelArgs
    from megatron.training.memory_estimate import layer_activation_elements
    from tests.helpers.models import saved_layer_elements

    monkeypatch.setattr(mlp_module, "check_mlp_support", lambda *a, **k: None)
    model_args = ModelArgs(num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=64, mlp_impl="quack",
                           **keys)
    derived = DerivedArgs(num_kv_heads=4, intermediate_size=ffn, max_position_embeddings=64, vocab_size=128,
                          padded_vocab_size=128)
    measured = saved_layer_elements(model_args, derived)
    expected = layer_activation_elements(model_args, derived, 1, False, False, fused_mlp=True)
    assert measured == pytest.approx(expected, rel=0.03)
    unfused = layer_activation_elements(model_args, derived, 1, False, False)  # eager: 2 (GELU), 4 (SwiGLU)
    assert expected == pytest.approx(unfused - (1 if not keys else 2) * ffn / 256)


@pytest.mark.parametrize("keys, build", [
    ({}, dict(checkpoint_activations=True)),
    (SWIGLU, dict(checkpoint_activations=True, recompute_modules=("mlp_act",))),
    (dict(gpt_j_residual=True), dict(recompute_modules=("mlp_act",)))], ids=["ckpt", "swiglu-ckpt-mlp_act", "mlp_act"])
def test_whole_model_on_the_fused_mlp_equals_the_torch_model(monkeypatch, keys, build):
    """GPTModel with mlp_impl quack (on the ops' torch math) against mlp_impl torch: loss and every parameter's
    gradient, under activation checkpointing and with `mlp_act` recomputation asked for (the fused layer
    already keeps only fc1's output, and ignores it)."""
    from megatron.model import GPTModel
    from megatron.mpu.random import model_parallel_seed
    from model_test_utils import VOCAB

    monkeypatch.setattr(mlp_module, "check_mlp_support", lambda *a, **k: None)
    gen = torch.Generator().manual_seed(4)
    tokens, labels = torch.randint(0, VOCAB, (2, 16), generator=gen), torch.randint(0, VOCAB, (2, 16), generator=gen)
    results = []
    for impl in ("torch", "quack"):
        model_args, derived = make_args(num_layers=2, mlp_impl=impl, **keys)
        torch.manual_seed(3)
        model = GPTModel(model_args, derived, ParallelState.single(), **build)
        model_parallel_seed(11, ParallelState.single())
        loss = model(tokens, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, **TOL, msg=name)
