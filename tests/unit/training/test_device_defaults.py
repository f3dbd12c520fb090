"""Fast by default: unset torch_compile / attention_impl / mlp_impl / mlp_autotune / sdpa_backend are chosen for the device; a value
the user wrote wins."""

from __future__ import annotations

from types import SimpleNamespace

from megatron.neox_args.sections import ModelArgs, TrainingArgs
from megatron.training.device_defaults import model_args_with, resolve_device_defaults

HOPPER, AMPERE = (9, 0), (8, 0)


def _args(torch_compile=None, **model_keys):
    """The two sections the resolution reads, as the config would hold them."""
    return SimpleNamespace(model=ModelArgs(**model_keys), training=TrainingArgs(torch_compile=torch_compile))


def test_unset_keys_compile_and_pick_cudnn_on_hopper_in_bf16():
    args = _args()
    choices = resolve_device_defaults(args.model, args.training, "cuda", "bf16", capability=HOPPER)
    assert choices.torch_compile is True and choices.sdpa_backend == "cudnn"
    assert any("torch_compile" in r for r in choices.reasons) and any("cudnn" in r for r in choices.reasons)
    built = model_args_with(args.model, choices)
    assert built.sdpa_backend == "cudnn" and args.model.sdpa_backend is None  # the section keeps what was written


def test_cpu_keeps_eager_and_torch_attention_choice():
    args = _args()
    choices = resolve_device_defaults(args.model, args.training, "cpu", "fp32")
    assert choices.torch_compile is False and choices.sdpa_backend is None


def test_no_cudnn_off_hopper_in_fp32_or_with_attention_dropout():
    args = _args()
    assert resolve_device_defaults(args.model, args.training, "cuda", "bf16", capability=AMPERE).sdpa_backend is None
    assert resolve_device_defaults(args.model, args.training, "cuda", "fp32", capability=HOPPER).sdpa_backend is None
    dropout = _args(attention_dropout=0.1)
    assert resolve_device_defaults(dropout.model, dropout.training, "cuda", "bf16", capability=HOPPER).sdpa_backend is None


def test_values_the_user_wrote_are_kept():
    args = _args(torch_compile=False, sdpa_backend="flash")
    choices = resolve_device_defaults(args.model, args.training, "cuda", "bf16", capability=HOPPER)
    assert choices.torch_compile is False and choices.sdpa_backend == "flash" and choices.reasons == []


def test_unset_attention_impl_picks_fa4_only_where_it_was_measured_faster():
    yes, no = (lambda: True), (lambda: False)
    long = _args(hidden_size=2048, num_attention_heads=16, seq_length=131072)  # head size 128
    choices = resolve_device_defaults(long.model, long.training, "cuda", "bf16", capability=HOPPER, fa4_available=yes)
    assert choices.attention_impl == "fa4" and choices.sdpa_backend is None
    assert any("attention_impl: fa4" in r for r in choices.reasons)
    assert model_args_with(long.model, choices).attention_impl == "fa4" and long.model.attention_impl is None
    # not installed, too short, unmeasured head size, Ampere, fp32, dropout: sdpa (cuDNN on Hopper half precision)
    for model_keys, capability, precision, available in [
            (dict(hidden_size=2048, num_attention_heads=16, seq_length=131072), HOPPER, "bf16", no),
            (dict(hidden_size=2048, num_attention_heads=16, seq_length=4096), HOPPER, "bf16", yes),
            (dict(hidden_size=2560, num_attention_heads=32, seq_length=131072), HOPPER, "bf16", yes),
            (dict(hidden_size=2048, num_attention_heads=16, seq_length=131072), AMPERE, "bf16", yes),
            (dict(hidden_size=2048, num_attention_heads=16, seq_length=131072), HOPPER, "fp32", yes),
            (dict(hidden_size=2048, num_attention_heads=16, seq_length=131072, attention_dropout=0.1), HOPPER,
             "bf16", yes)]:
        args = _args(**model_keys)
        choices = resolve_device_defaults(args.model, args.training, "cuda", precision, capability=capability,
                                          fa4_available=available)
        assert choices.attention_impl == "sdpa", model_keys
    written = _args(attention_impl="sdpa", hidden_size=2048, num_attention_heads=16, seq_length=131072)
    assert resolve_device_defaults(written.model, written.training, "cuda", "bf16", capability=HOPPER,
                                   fa4_available=yes).attention_impl == "sdpa"
    cpu = resolve_device_defaults(long.model, long.training, "cpu", "fp32", fa4_available=yes)
    assert cpu.attention_impl == "sdpa"


def test_unset_mlp_impl_picks_quack_for_a_bf16_gelu_or_swiglu_mlp_on_hopper():
    yes, no = (lambda: True), (lambda: False)
    gelu = _args(activation="gelu")
    choices = resolve_device_defaults(gelu.model, gelu.training, "cuda", "bf16", capability=HOPPER, quack_available=yes)
    assert choices.mlp_impl == "quack" and any("mlp_impl: quack" in r and "GELU" in r for r in choices.reasons)
    assert model_args_with(gelu.model, choices).mlp_impl == "quack" and gelu.model.mlp_impl is None
    llama = _args(activation="swiglu", use_bias_in_mlp=False)
    choices = resolve_device_defaults(llama.model, llama.training, "cuda", "bf16", capability=HOPPER,
                                      quack_available=yes)
    assert choices.mlp_impl == "quack" and any("SwiGLU" in r for r in choices.reasons)
    # not installed, Ampere, fp32, SwiGLU with biases, sequence parallelism in effect, the CPU: the torch layer
    for keys, device, capability, precision, available, sp in [
            (dict(activation="gelu"), "cuda", HOPPER, "bf16", no, False),
            (dict(activation="gelu"), "cuda", AMPERE, "bf16", yes, False),
            (dict(activation="gelu"), "cuda", HOPPER, "fp32", yes, False),
            (dict(activation="swiglu"), "cuda", HOPPER, "bf16", yes, False),
            (dict(activation="gelu"), "cuda", HOPPER, "bf16", yes, True),
            (dict(activation="gelu"), "cpu", None, "bf16", yes, False)]:
        args = _args(**keys)
        choices = resolve_device_defaults(args.model, args.training, device, precision, capability=capability,
                                          quack_available=available, sequence_parallel=sp)
        assert choices.mlp_impl == "torch" and not any("mlp_impl" in r for r in choices.reasons), keys
    odd = _args(activation="gelu", hidden_size=1004)  # not a multiple of 8: quack's GEMMs cannot take it
    assert resolve_device_defaults(odd.model, odd.training, "cuda", "bf16", capability=HOPPER, quack_available=yes,
                                   mlp_width=4000).mlp_impl == "torch"
    assert resolve_device_defaults(gelu.model, gelu.training, "cuda", "bf16", capability=HOPPER, quack_available=yes,
                                   mlp_width=4100).mlp_impl == "torch"  # the per-rank width
    assert resolve_device_defaults(gelu.model, gelu.training, "cuda", "bf16", capability=HOPPER, quack_available=yes,
                                   zero_stage=3).mlp_impl == "torch"  # ZeRO-3 gathers weights per module
    written = _args(activation="gelu", mlp_impl="torch")
    assert resolve_device_defaults(written.model, written.training, "cuda", "bf16", capability=HOPPER,
                                   quack_available=yes).mlp_impl == "torch"


def test_unset_mlp_autotune_is_on_where_the_mlp_runs_on_quack():
    yes = lambda: True  # noqa: E731
    gelu = _args(activation="gelu")
    choices = resolve_device_defaults(gelu.model, gelu.training, "cuda", "bf16", capability=HOPPER, quack_available=yes)
    assert choices.mlp_autotune and any(r.startswith("mlp_autotune: true (unset") for r in choices.reasons)
    built = model_args_with(gelu.model, choices)
    assert built.mlp_autotune is True and gelu.model.mlp_autotune is None  # the config section keeps what was written
    off = _args(activation="gelu", mlp_autotune=False)  # a written value wins, and is not announced
    choices = resolve_device_defaults(off.model, off.training, "cuda", "bf16", capability=HOPPER, quack_available=yes)
    assert choices.mlp_impl == "quack" and not choices.mlp_autotune
    assert not any("mlp_autotune" in r for r in choices.reasons)
    # the torch layer: unset is off, silently; a written true it cannot use is dropped with a notice
    for device, capability in (("cpu", None), ("cuda", AMPERE)):
        choices = resolve_device_defaults(gelu.model, gelu.training, device, "bf16", capability=capability,
                                          quack_available=yes)
        assert choices.mlp_impl == "torch" and not choices.mlp_autotune
        assert not any("mlp_autotune" in r for r in choices.reasons)
    on = _args(activation="gelu", mlp_autotune=True)
    choices = resolve_device_defaults(on.model, on.training, "cpu", "fp32")
    assert not choices.mlp_autotune and any("mlp_autotune: true does nothing" in r for r in choices.reasons)
    assert model_args_with(on.model, choices).mlp_autotune is False
