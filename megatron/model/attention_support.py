"""Whether the chosen attention kernel can run here: packages installed, features present.

Shape checks that need no installed package (head size, dropout, precision) are in
megatron/neox_args/validate_long_seq.py and run at launch; these run when the model is built (on the
workers, which have the same packages as the launcher), so that a shipped config naming `fa4` still
validates on a machine without the package. Every failure is a ConfigError naming the key and the fix.
"""

from __future__ import annotations

import inspect

from megatron.model.attention_kernels import FA4_PACKAGE, import_fa4, import_flash_attn
from megatron.neox_args.errors import ConfigError


def torch_varlen_has_window() -> bool:
    """torch's `varlen_attn` takes `window_size` (torch >= 2.12; older ones have only `is_causal`)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def check_attention_support(model, device_type: str | None = None) -> None:
    """Raise ConfigError when `model.attention_impl` (with `sliding_window_width`) cannot run here."""
    impl = model.attention_impl
    if impl == "fa4" and import_fa4() is None:
        raise ConfigError(
            f"attention_impl: fa4 needs FlashAttention-4 (`import flash_attn.cute`), which is not installed: "
            f"pip install {FA4_PACKAGE} (it brings nvidia-cutlass-dsl; CUDA, Hopper or Blackwell GPUs), or set "
            f"attention_impl: sdpa.", key="attention_impl")
    if impl == "flash" and import_flash_attn() is None:
        raise ConfigError(
            "attention_impl: flash needs the flash-attn package (`from flash_attn import flash_attn_func`), "
            "which is not installed: pip install flash-attn, or set attention_impl: sdpa (or fa4).",
            key="attention_impl")
    if impl == "flash" and model.sliding_window_width is not None:
        version = getattr(import_flash_attn(), "__version__", "0")
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (2, 3):
            raise ConfigError(
                f"sliding_window_width: {model.sliding_window_width} with attention_impl: flash needs flash-attn >= "
                f"2.3 (window_size), this is {version}: pip install -U flash-attn, or set attention_impl: fa4.",
                key="sliding_window_width")
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if impl in ("fa4", "flash") and device_type != "cuda":
        raise ConfigError(
            f"attention_impl: {impl} runs on CUDA GPUs only, and this run has none; set attention_impl: sdpa "
            f"(which has a CPU path for documents and sliding windows).", key="attention_impl")
    if impl in (None, "sdpa") and model.sliding_window_width is not None and device_type == "cuda" \
            and not torch_varlen_has_window():
        import torch

        raise ConfigError(
            f"sliding_window_width: {model.sliding_window_width} with attention_impl: sdpa needs torch's "
            f"varlen_attn with window_size (torch >= 2.12; this is torch {torch.__version__}); set attention_impl: "
            f"fa4 (pip install {FA4_PACKAGE}) or flash, or drop sliding_window_width.", key="sliding_window_width")
