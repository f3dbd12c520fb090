"""Memory levers are exact against the plain path (fp32, CPU): the MLP in sequence chunks
(`mlp_chunk_size`), activation checkpointing with the layer inputs offloaded (`checkpoint_in_cpu`) and
checkpointing that keeps the attention kernel's work (`checkpoint_keep_attention`); loss and every
parameter's gradient. Dropout is on where the RNG replay matters (offload), and the
offloaded path is checked to keep no layer input in the autograd graph."""

import pytest
import torch

from megatron.model import GPTModel
from megatron.model.mlp import ParallelMLP
from megatron.mpu.initialize import ParallelState
from megatron.mpu.random import model_parallel_seed
from model_test_utils import VOCAB, make_args

TOL = 1e-6


def _loss_and_grads(model, tokens, labels, seed=11):
    model_parallel_seed(seed, ParallelState.single())
    model.zero_grad()
    loss = model(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _build(seed=3, **kwargs):
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("checkpoint_activations", "checkpoint_in_cpu",
                                                                     "checkpoint_num_layers", "recompute_modules",
                                                                     "checkpoint_keep_attention")}
    model_args, derived = make_args(num_layers=3, **overrides)
    torch.manual_seed(seed)
    return GPTModel(model_args, derived, ParallelState.single(), **kwargs)


def _batch(b=2, s=16):
    gen = torch.Generator().manual_seed(4)
    return torch.randint(0, VOCAB, (b, s), generator=gen), torch.randint(0, VOCAB, (b, s), generator=gen)


def _assert_same(a, b, tol=TOL):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=tol, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=tol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_chunks_equal_the_whole_sequence(chunk, activation):
    tokens, labels = _batch()
    plain = _loss_and_grads(_build(activation=activation), tokens, labels)
    chunked = _loss_and_grads(_build(activation=activation, mlp_chunk_size=chunk), tokens, labels)
    _assert_same(plain, chunked)
    with_ckpt = _loss_and_grads(_build(activation=activation, mlp_chunk_size=chunk, checkpoint_activations=True),
                                tokens, labels)
    _assert_same(plain, with_ckpt)


def test_mlp_chunks_never_hold_the_whole_intermediate():
    """The largest tensor autograd saves inside a chunked MLP is one chunk's [c, b, ffn], not [s, b, ffn]."""
    model_args, derived = make_args(mlp_chunk_size=4)
    mlp = ParallelMLP(model_args, derived, ParallelState.single())
    x = torch.randn(16, 2, model_args.hidden_size, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x)
    y.sum().backward()
    ffn = derived.intermediate_size
    assert max(sizes) < 16 * 2 * ffn, "a whole [s, b, ffn] tensor was saved"
    mlp.chunk_size = None
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    assert max(sizes) == 16 * 2 * ffn  # negative control: the plain MLP saves it whole


@pytest.mark.parametrize("num_layers_per_chunk", [1, 2])
def test_offloaded_checkpoint_equals_plain_checkpoint_and_no_checkpoint(num_layers_per_chunk):
    tokens, labels = _batch()
    common = dict(hidden_dropout=0.1, attention_dropout=0.1, checkpoint_num_layers=num_layers_per_chunk)
    plain_ckpt = _loss_and_grads(_build(checkpoint_activations=True, **common), tokens, labels)
    offloaded = _loss_and_grads(_build(checkpoint_activations=True, checkpoint_in_cpu=True, **common), tokens, labels)
    _assert_same(plain_ckpt, offloaded, tol=0.0)  # the same operations in the same order: bitwise
    no_ckpt = _loss_and_grads(_build(**common), tokens, labels)
    _assert_same(no_ckpt, offloaded)


def test_offloaded_checkpoint_replays_dropout():
    """Negative control: recomputing without the forward's RNG states gives other dropout masks, so
    different gradients; the offloaded checkpoint must restore them."""
    from megatron.model import offload

    tokens, labels = _batch()
    common = dict(hidden_dropout=0.3, checkpoint_activations=True, checkpoint_in_cpu=True)
    good = _loss_and_grads(_build(**common), tokens, labels)
    original = offload._set_rng_state
    calls = {"n": 0}

    def skip_first_restore(state):  # the backward's restore of the forward state is skipped
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            original(state)

    offload._set_rng_state = skip_first_restore
    try:
        bad = _loss_and_grads(_build(**common), tokens, labels)
    finally:
        offload._set_rng_state = original
    assert calls["n"] > 0
    assert any(not torch.allclose(good[1][n], bad[1][n], atol=1e-4) for n in good[1])


def test_offloaded_checkpoint_frees_the_device_input():
    """After the forward, nothing but the host copy holds a chunk's input: the tensor itself is freed.
    Negative control: the plain checkpoint keeps it alive (it is what it recomputes from)."""
    import gc
    import weakref

    from megatron.model.offload import offloaded_checkpoint
    from megatron.mpu.random import checkpoint

    model = _build(checkpoint_activations=True)
    tokens, _ = _batch()
    alive = {}
    outs = []
    for name, fn in (("offloaded", offloaded_checkpoint), ("plain", checkpoint)):
        x = model.embedding(tokens) * 1.0  # a fresh non-leaf [s, b, h] that requires grad
        alive[name] = weakref.ref(x)
        outs.append(fn(model._run_layers(0, 3), x))
        del x
        gc.collect()
    assert alive["offloaded"]() is None
    assert alive["plain"]() is not None
    sum(o.sum() for o in outs).backward()  # both still back-propagate


@pytest.mark.parametrize("modules", [("core_attn",), ("mlp_act",), ("core_attn", "mlp_act")])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_selective_recompute_is_exact_and_saves_what_it_names(modules, activation):
    tokens, labels = _batch()
    common = dict(activation=activation, hidden_dropout=0.1, attention_dropout=0.1)
    plain_model = _build(**common)
    plain = _loss_and_grads(plain_model, tokens, labels)
    model = _build(recompute_modules=modules, **common)
    _assert_same(plain, _loss_and_grads(model, tokens, labels), tol=0.0)  # same ops, same masks: bitwise

    def saved_bytes(m):
        """Bytes of the activations autograd keeps (parameters excluded) outside the model's own hooks."""
        params = {p.data_ptr() for p in m.parameters()}
        total = []

        def pack(t):
            if t.data_ptr() not in params:
                total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model_parallel_seed(11, ParallelState.single())
            m(tokens, labels)
        return sum(total)

    model_args, derived = make_args(activation=activation)
    e = 2 * 16 * model_args.hidden_size * 4  # one [s, b, h] fp32 tensor
    ffn = 2 * 16 * derived.intermediate_size * 4
    saved = saved_bytes(plain_model) - saved_bytes(model)
    expected = 3 * ((e if "core_attn" in modules else 0) + (ffn if "mlp_act" in modules else 0))  # 3 layers
    if "core_attn" in modules:  # at least the output; the CPU kernel also keeps its probabilities
        assert saved >= expected, (saved, expected)
    else:
        assert saved == expected, (saved, expected)


@pytest.mark.parametrize("gpt_j_residual", [True, False])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_keep_attention_checkpoint_equals_plain_checkpoint_and_no_checkpoint(gpt_j_residual, num_kv_heads):
    """Checkpointing in two pieces around the attention kernel gives the plain checkpoint's and the
    un-checkpointed model's loss and gradients, with both dropouts on (their masks replayed in the
    recomputed pieces, the attention kernel's own never recomputed), rotary, and grouped-query attention."""
    tokens, labels = _batch()
    common = dict(hidden_dropout=0.1, attention_dropout=0.1, gpt_j_residual=gpt_j_residual,
                  num_kv_heads=num_kv_heads)
    plain_ckpt = _loss_and_grads(_build(checkpoint_activations=True, **common), tokens, labels)
    kept = _loss_and_grads(_build(checkpoint_activations=True, checkpoint_keep_attention=True, **common),
                           tokens, labels)
    _assert_same(plain_ckpt, kept)
    no_ckpt = _loss_and_grads(_build(**common), tokens, labels)
    _assert_same(no_ckpt, kept)


def test_keep_attention_checkpoint_with_documents():
    """Document-aware batches (positions restarting, attention within documents) through the kept kernel."""
    from megatron.data.doc_masks import DocumentMasking, document_fields

    tokens, labels = _batch()
    tokens[:, 5] = 0
    tokens[1, 11] = 0
    fields = document_fields(tokens, DocumentMasking(eod=0, reset_position_ids=True, reset_attention_mask=True))
    assert fields["cu_seqlens"].numel() > 3  # several documents per row
    results = []
    for keep in (False, True):
        model = _build(checkpoint_activations=True, checkpoint_keep_attention=keep)
        model_parallel_seed(11, ParallelState.single())
        loss = model(tokens, labels, **fields)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _assert_same(*results)


def test_keep_attention_runs_the_attention_kernel_once_per_layer(monkeypatch):
    """The point of it: a training step runs each layer's attention kernel once (plain checkpointing runs
    it twice: forward and recompute). Counted through the kernel entry point the layer calls."""
    from megatron.model import attention

    calls = {"n": 0}
    original = attention.causal_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_attention", counting)
    tokens, labels = _batch()
    counts = {}
    for keep in (False, True):
        calls["n"] = 0
        _loss_and_grads(_build(checkpoint_activations=True, checkpoint_keep_attention=keep), tokens, labels)
        counts[keep] = calls["n"]
    assert counts == {False: 6, True: 3}  # 3 layers


def test_keep_attention_keeps_no_view_of_the_fused_qkv_buffer():
    """What the step holds between forward and backward: with checkpoint_keep_attention the attention
    kernel keeps q, k, v of their own storage, never a view of the [s, b, 3h] qkv projection output (v is
    one), which would keep the whole buffer. Negative control: the un-checkpointed layer saves that buffer."""
    tokens, labels = _batch()

    def saved_storages(model):  # elements of each saved activation's storage (weights left out)
        storages = []
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages.append(t.untyped_storage().nbytes() // t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, labels).backward()
        return storages

    kept = _build(checkpoint_activations=True, checkpoint_keep_attention=True)
    qkv_elements = tokens.numel() * kept.layers[0].attention.linear_qkv.weight.shape[0]  # s b 3h
    h = kept.layers[0].attention.linear_qkv.weight.shape[1]
    storages = saved_storages(kept)
    assert qkv_elements not in storages, "a saved tensor shares the qkv buffer's storage"
    assert storages.count(tokens.numel() * h) >= 3 * 4  # per layer: its input, q, k, v, output ([s, b, h] each)
    assert qkv_elements in saved_storages(_build())  # negative control
