"""Fast by default: unset torch_compile / sdpa_backend are chosen for the device; a value the user wrote wins."""

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
