"""GPTModel: every option combination runs forward/backward; init std per method; activation
checkpointing is exact; sequence-parallel marks; the masked loss; torch_compile is only a flag."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTModel
from megatron.model.init import init_std
from megatron.mpu.initialize import ParallelState
from megatron.mpu.random import model_parallel_seed
from model_test_utils import VOCAB, make_args


def _batch(b=2, s=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=gen)
    labels = torch.randint(0, VOCAB, (b, s), generator=gen)
    mask = (torch.rand(b, s, generator=gen) > 0.3).float()
    return tokens, labels, mask


OPTIONS = {
    "neox-pythia": dict(rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True),
    "neox-sequential-tied": dict(gpt_j_residual=False),
    "llama-gqa": dict(num_kv_heads=2, norm="rmsnorm", activation="swiglu", no_weight_tying=True,
                      use_bias_in_attn_linear=False, use_bias_in_mlp=False, rotary_emb_base=500000),
    "mqa-relu-nonorm-bias": dict(num_kv_heads=1, activation="relu", use_bias_in_norms=False),
    "learned-pos": dict(pos_emb="learned", max_position_embeddings=32, gpt_j_residual=True),
    "no-pos-rmsnorm-gelu": dict(pos_emb="none", norm="rmsnorm"),
    "dropout-normal-init": dict(hidden_dropout=0.1, attention_dropout=0.1, init_method="normal",
                                output_layer_init_method="scaled_normal"),
    "swiglu-tied-bias": dict(activation="swiglu", gpt_j_residual=True),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_build_forward_backward(name):
    model_args, derived = make_args(**OPTIONS[name])
    torch.manual_seed(0)
    model_parallel_seed(0, ParallelState.single())
    model = GPTModel(model_args, derived, ParallelState.single()).train()
    tokens, labels, mask = _batch()
    logits = model(tokens)
    assert logits.shape == (2, 16, VOCAB)
    loss = model.loss(logits, labels, mask)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(VOCAB)) < 1.5
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gets no gradient"
    keys = set(model.state_dict())
    assert ("output_layer.weight" in keys) == model_args.no_weight_tying
    assert ("embedding.position_embeddings.weight" in keys) == (model_args.pos_emb == "learned")
    assert ("layers.0.mlp.linear_gate.weight" in keys) == (model_args.activation == "swiglu")


def test_loss_is_masked_mean_cross_entropy():
    model_args, derived = make_args()
    model = GPTModel(model_args, derived, ParallelState.single())
    tokens, labels, mask = _batch()
    logits = torch.randn(2, 16, VOCAB)
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    expected = (per_token * mask.reshape(-1)).sum() / mask.sum()
    torch.testing.assert_close(model.loss(logits, labels, mask), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init_method,output_method", [("normal", "scaled_normal"), ("small_init", "wang_init"),
                                                       ("wang_init", "normal")])
def test_init_std_per_method(init_method, output_method):
    model_args, derived = make_args(hidden_size=256, num_layers=4, num_attention_heads=4, intermediate_size=512,
                                    init_method=init_method, output_layer_init_method=output_method,
                                    init_method_std=0.05, no_weight_tying=True)
    torch.manual_seed(0)
    model = GPTModel(model_args, derived, ParallelState.single())
    expected = {
        "normal": 0.05, "small_init": math.sqrt(2 / (5 * 256)), "wang_init": 2 / (4 * math.sqrt(256)),
        "scaled_normal": 0.05 / math.sqrt(2 * 4),
    }
    assert init_std(init_method, model_args) == pytest.approx(expected[init_method])
    input_side = ["attention.linear_qkv.weight", "mlp.linear_fc1.weight"]
    output_side = ["attention.linear_proj.weight", "mlp.linear_fc2.weight"]
    for name, p in model.named_parameters():
        if any(name.endswith(s) for s in input_side) or name in ("embedding.word_embeddings.weight",
                                                                 "output_layer.weight"):
            want = expected[init_method]
        elif any(name.endswith(s) for s in output_side):
            want = expected[output_method]
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
            continue
        else:  # norm weights
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        # >= 32k samples: the std estimate is within 2% with overwhelming probability
        assert p.std().item() == pytest.approx(want, rel=0.03), name
        assert abs(p.mean().item()) < 3 * want / math.sqrt(p.numel()) + 1e-9, name


@pytest.mark.parametrize("num_layers,chunk", [(3, 1), (3, 2)])
def test_activation_checkpointing_is_exact(num_layers, chunk):
    """Same loss and gradients with and without recomputation, dropout on (masks replayed)."""
    model_args, derived = make_args(num_layers=num_layers, hidden_dropout=0.2, attention_dropout=0.2)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPTModel(model_args, derived, ParallelState.single(), checkpoint_activations=checkpointing,
                         checkpoint_num_layers=chunk).train()
        model_parallel_seed(1, ParallelState.single())
        tokens, labels, mask = _batch()
        loss = model.loss(model(tokens), labels, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-7, rtol=0, msg=name)


def test_dropout_changes_output_and_eval_is_deterministic():
    model_args, derived = make_args(hidden_dropout=0.3, attention_dropout=0.3)
    model_parallel_seed(0, ParallelState.single())
    model = GPTModel(model_args, derived, ParallelState.single())
    tokens, _, _ = _batch()
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_sequence_parallel_marks_each_param_once_and_matches_at_tp1():
    model_args, derived = make_args(pos_emb="learned", no_weight_tying=True)
    torch.manual_seed(0)
    plain = GPTModel(model_args, derived, ParallelState.single())
    torch.manual_seed(0)
    sp = GPTModel(model_args, derived, ParallelState.single(sequence_parallel=True))
    marked = sorted(n for n, p in sp.named_parameters() if getattr(p, "sequence_parallel_grad", False))
    expected = ["embedding.position_embeddings.weight", "final_norm.bias", "final_norm.weight"]
    for i in range(2):
        expected += [f"layers.{i}.{m}" for m in ("input_norm.weight", "input_norm.bias",
                                                 "post_attention_norm.weight", "post_attention_norm.bias",
                                                 "attention.linear_proj.bias", "mlp.linear_fc2.bias")]
    assert marked == sorted(expected)
    assert not any(getattr(p, "sequence_parallel_grad", False) for p in plain.parameters())
    # named_parameters() de-duplicates: each parameter is reached through exactly one module
    assert len(list(sp.parameters())) == len({id(p) for p in sp.parameters()})
    tokens, _, _ = _batch()
    torch.testing.assert_close(sp(tokens), plain(tokens), atol=0, rtol=0)


def test_torch_compile_is_a_flag_that_keeps_keys():
    model_args, derived = make_args()
    torch.manual_seed(0)
    eager = GPTModel(model_args, derived, ParallelState.single())
    torch.manual_seed(0)
    compiled = GPTModel(model_args, derived, ParallelState.single(), torch_compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.layers)


def test_layers_share_one_rotary_table_and_the_model_matches_computing_it():
    """GPTModel keeps one cos/sin table for all its layers (positional.share_rotary_tables); the model's
    output and gradients are those of layers that compute cos and sin per call."""
    model_args, derived = make_args(**OPTIONS["neox-pythia"])
    torch.manual_seed(0)
    model = GPTModel(model_args, derived, ParallelState.single())
    rotaries = {id(layer.attention.rotary) for layer in model.layers}
    assert len(rotaries) == 1 and model.layers[0].attention.rotary.cos_table.shape[0] == derived.max_position_embeddings
    torch.manual_seed(0)
    computing = GPTModel(model_args, derived, ParallelState.single())
    for layer in computing.layers:
        layer.attention.rotary.cos_table = layer.attention.rotary.sin_table = None
    tokens, labels, mask = _batch()
    loss = model.loss(model(tokens), labels, mask)
    reference = computing.loss(computing(tokens), labels, mask)
    torch.testing.assert_close(loss, reference, atol=0, rtol=0)
    loss.backward()
    reference.backward()
    for (name, p), q in zip(model.named_parameters(), computing.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)


def test_compiled_rotary_reads_the_tables_instead_of_computing_cos_and_sin():
    """Compiled (inductor's C++ on the CPU; tests/gpu checks its Triton on CUDA), the attention's q, k, v
    read cos and sin from the kept tables: no cos or sin is evaluated per element, and the values are the
    eager layer's, with positions 0..s-1 and restarting per document."""
    import re

    from torch._inductor.utils import run_and_get_code

    model_args, derived = make_args(**OPTIONS["neox-pythia"])
    attention = GPTModel(model_args, derived, ParallelState.single()).layers[0].attention
    s = model_args.seq_length
    x = torch.randn(s, 2, model_args.hidden_size)
    for position_ids in (None, torch.arange(s).remainder(5).expand(2, -1)):
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(attention.qkv_heads), x, position_ids)
        assert not re.search(r"(::|\.)(cos|sin)f?\(", "\n".join(code))
        for g, e in zip(got, attention.qkv_heads(x, position_ids)):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_bf16_precision_builds_bf16_params():
    model_args, derived = make_args()
    model = GPTModel(model_args, derived, ParallelState.single(), precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(_batch()[0])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_bad_arguments_are_errors():
    model_args, derived = make_args()
    with pytest.raises(ValueError, match="precision"):
        GPTModel(model_args, derived, ParallelState.single(), precision="fp8")
    with pytest.raises(ValueError, match="checkpoint_num_layers"):
        GPTModel(model_args, derived, ParallelState.single(), checkpoint_num_layers=0)


@pytest.mark.parametrize("activation", ["silu", "swish", "softsign", "mish", "relu", "geglu", "reglu", "bilinear",
                                        "glu", "swiglu"])
def test_every_gpt_neox_activation_matches_a_reference(activation):
    """GPT-NeoX's activations: plain act(fc1 x), or gated act(gate x) * up x (upstream's Gated_Activation)."""
    import torch.nn.functional as F

    from megatron.model.mlp import ParallelMLP

    model_args, derived = make_args(activation=activation)
    torch.manual_seed(0)
    mlp = ParallelMLP(model_args, derived, ParallelState.single())
    x = torch.randn(5, 2, 32)
    fn = {"silu": F.silu, "swish": F.silu, "softsign": F.softsign, "mish": lambda t: t * torch.tanh(F.softplus(t)),
          "relu": F.relu, "geglu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))), "reglu": F.relu,
          "bilinear": lambda t: t, "glu": lambda t: 1 / (1 + torch.exp(-t)), "swiglu": lambda t: t * torch.sigmoid(t)}
    up = x @ mlp.linear_fc1.weight.t() + mlp.linear_fc1.bias
    if mlp.linear_gate is not None:
        inner = fn[activation](x @ mlp.linear_gate.weight.t() + mlp.linear_gate.bias) * up
    else:
        inner = fn[activation](up)
    expected = inner @ mlp.linear_fc2.weight.t() + mlp.linear_fc2.bias
    assert (mlp.linear_gate is not None) == (activation in ("geglu", "reglu", "bilinear", "glu", "swiglu"))
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, expected", [("default", {}), ("reduce-overhead", {"mode": "reduce-overhead"}),
                                            ("max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"})])
def test_torch_compile_mode_reaches_torch_compile(monkeypatch, mode, expected):
    """`compile_mode` (training.torch_compile_mode) is what every layer's torch.compile gets; "default" passes
    nothing, so torch's own default applies. (The CUDA graphs themselves: tests/gpu/test_gpu_cudagraphs.py.)"""
    seen = []
    real_compile = torch.compile

    def recording_compile(fn, **kwargs):
        seen.append(kwargs)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    model_args, derived = make_args()
    model = GPTModel(model_args, derived, ParallelState.single(), torch_compile=True, compile_mode=mode)
    assert seen == [expected] * len(model.layers)
