"""Whether `mlp_impl: quack` (megatron/model/fused_mlp.py) can run here, checked when the model is built: the
rules that need no package (`fused_mlp_refusal` in megatron/neox_args/validate_mlp.py, which also checks them
at launch), then a CUDA GPU and quack installed. Every failure is a ConfigError naming the key and the fix."""

from __future__ import annotations

import torch

from megatron.neox_args.errors import ConfigError
from megatron.neox_args.validate_mlp import fused_mlp_refusal

QUACK_PACKAGE = "quack-kernels>=0.6.5"
"""The pip requirement that provides `quack` with its composable epilogues (it brings nvidia-cutlass-dsl;
requirements/requirements-quack.txt)."""


_IMPORT_ERROR: list[str] = []
"""Why the last `import_quack` failed (for the ConfigError)."""


def import_quack():
    """quack's GEMM interface and our epilogue mods, or None where they do not import (no package, or the
    CuTe DSL failing to load its libraries: e.g. a machine without CUDA).

    quack keys its kernel cache by fingerprinting each epilogue's code, and takes code under a
    `site-packages` (or `dist-packages`) folder as an installed library it keys by name; unpacked anywhere
    else, cutlass's own internals are fingerprinted and our epilogues fail to build (TypeError at import)."""
    try:
        from quack import gemm_interface
        from quack.epilogue.library import dact_mod, dgated_mod, linear_act_mod

        import megatron.model.quack_mlp_epilogue  # noqa: F401  (the epilogues fused_mlp's backward runs)

        # the epilogues quack builds on first use for fused_mlp's calls: built (and fingerprinted) here, where a
        # failure means "the torch layer", rather than at the first training step
        for activation in ("gelu_erf", "gelu_tanh_approx"):
            for bias in (True, False):
                linear_act_mod(activation, gated=False, has_c=False, has_rowvec=bias, has_colvec=False)
            dact_mod(activation)
        linear_act_mod("swiglu", gated=True, has_c=False, has_rowvec=False, has_colvec=False)
        dgated_mod("swiglu", has_scale=False, has_reduce=False)
    except Exception as error:  # ImportError, or the DSL's own errors at import
        _IMPORT_ERROR[:] = [f"{type(error).__name__}: {str(error)[:300]}"]
        return None
    return gemm_interface


def check_mlp_support(model, dtype: torch.dtype, sequence_parallel: bool, device_type: str | None = None,
                      width_per_rank: int | None = None) -> None:
    """Raise ConfigError when `model.mlp_impl` is quack and it cannot run for this layer (`dtype`: the
    parameters'; `sequence_parallel`: in effect, i.e. with more than one tensor-parallel rank;
    `width_per_rank`: intermediate_size / model_parallel_size): the rules of `fused_mlp_refusal`, then a CUDA
    GPU and the package."""
    if model.mlp_impl != "quack":
        return
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    refusal = fused_mlp_refusal(model.activation, model.use_bias_in_mlp, precision, sequence_parallel,
                                hidden=model.hidden_size, width_per_rank=width_per_rank)
    if refusal is not None:
        raise ConfigError(refusal[0].replace(" {where}", ""), key="mlp_impl")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type != "cuda":
        raise ConfigError("mlp_impl: quack runs on CUDA GPUs only, and this run has none; set mlp_impl: torch.",
                          key="mlp_impl")
    if import_quack() is None:
        raise ConfigError(f"mlp_impl: quack needs quack-kernels (`import quack`), which does not import here "
                          f"({_IMPORT_ERROR[0] if _IMPORT_ERROR else 'unknown error'}): pip install '{QUACK_PACKAGE}' "
                          f"(CUDA; Hopper or Blackwell GPUs), or set mlp_impl: torch.", key="mlp_impl")
