"""Whether `mlp_impl: quack` (megatron/model/fused_mlp.py) can run here: quack installed, a CUDA GPU, a
GELU MLP (or a SwiGLU one without biases) in bf16 without sequence parallelism. Checked when the model is built (the launch-time checks that
need no package are megatron/neox_args/validate_mlp.py). Every failure is a ConfigError naming the key and
the fix."""

from __future__ import annotations

import torch

from megatron.neox_args.errors import ConfigError

FUSED_ACTIVATIONS = ("gelu", "swiglu")
"""The MLP activations megatron/model/fused_mlp.py fuses (SwiGLU without biases)."""

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


def quack_mlp_shapes_ok(hidden: int, width_per_rank: int) -> bool:
    """quack's GEMMs address bf16 operands through TMA, whose strides must be multiples of 16 bytes: the
    hidden size and this rank's MLP width must be multiples of 8."""
    return hidden % 8 == 0 and width_per_rank % 8 == 0


def check_mlp_support(model, dtype: torch.dtype, sequence_parallel: bool, device_type: str | None = None,
                      width_per_rank: int | None = None) -> None:
    """Raise ConfigError when `model.mlp_impl` is quack and it cannot run for this layer (`dtype`: the
    parameters'; `sequence_parallel`: in effect, i.e. with more than one tensor-parallel rank;
    `width_per_rank`: intermediate_size / model_parallel_size)."""
    if model.mlp_impl != "quack":
        return
    if width_per_rank is not None and not quack_mlp_shapes_ok(model.hidden_size, width_per_rank):
        raise ConfigError(f"mlp_impl: quack needs hidden_size ({model.hidden_size}) and the MLP width per tensor-"
                          f"parallel rank ({width_per_rank}) to be multiples of 8 (16-byte rows for its GEMMs); "
                          f"change intermediate_size or hidden_size, or set mlp_impl: torch.", key="mlp_impl")
    if model.activation not in FUSED_ACTIVATIONS:
        raise ConfigError(f"mlp_impl: quack fuses the GELU and SwiGLU MLPs, and activation is {model.activation!r}; "
                          f"set activation: gelu or swiglu, or mlp_impl: torch.", key="mlp_impl")
    if model.activation == "swiglu" and model.use_bias_in_mlp:
        raise ConfigError("mlp_impl: quack fuses the SwiGLU MLP without biases, and use_bias_in_mlp is true; set "
                          "use_bias_in_mlp: false, or mlp_impl: torch.", key="mlp_impl")
    if dtype != torch.bfloat16:
        raise ConfigError(f"mlp_impl: quack runs in bf16, and this model's parameters are {dtype}; set "
                          f"bf16: {{enabled: true}}, or mlp_impl: torch.", key="mlp_impl")
    if sequence_parallel:
        raise ConfigError("mlp_impl: quack does not take sequence_parallel; set sequence_parallel: false, or "
                          "mlp_impl: torch.", key="mlp_impl")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type != "cuda":
        raise ConfigError("mlp_impl: quack runs on CUDA GPUs only, and this run has none; set mlp_impl: torch.",
                          key="mlp_impl")
    if import_quack() is None:
        raise ConfigError(f"mlp_impl: quack needs quack-kernels (`import quack`), which does not import here "
                          f"({_IMPORT_ERROR[0] if _IMPORT_ERROR else 'unknown error'}): pip install '{QUACK_PACKAGE}' "
                          f"(CUDA; Hopper or Blackwell GPUs), or set mlp_impl: torch.", key="mlp_impl")
