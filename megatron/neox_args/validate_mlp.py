"""Where `mlp_impl: quack` (megatron/model/fused_mlp.py) can run, as far as no installed package is needed:
`fused_mlp_refusal` is the one statement of the rules (activation and biases, precision, ZeRO stage 3,
sequence parallelism, alignment), used at launch here, when the model is built (megatron/model/mlp_support.py,
which adds the GPU and the package) and for the default (megatron/training/device_defaults.py)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from megatron.neox_args.validate_long_seq import _fail, _precision

FUSED_ACTIVATIONS = ("gelu", "swiglu")
"""The MLP activations megatron/model/fused_mlp.py fuses (SwiGLU without biases)."""


def fused_mlp_refusal(activation: str, use_bias_in_mlp: bool, precision: str, sequence_parallel: bool,
                      zero_stage: int = 0, hidden: Optional[int] = None,
                      width_per_rank: Optional[int] = None) -> Optional[tuple[str, tuple[str, ...]]]:
    """None where the fused MLP can run, else (message with a `{where}` slot, the keys it names).
    `precision`: "bf16", "fp16" or "fp32"; `sequence_parallel`: in effect (more than one tensor-parallel rank);
    `hidden` / `width_per_rank` (intermediate_size / model_parallel_size): checked when given."""
    if activation not in FUSED_ACTIVATIONS:
        return (f"mlp_impl: quack fuses the GELU and SwiGLU MLPs, and activation is {activation!r} {{where}}; set "
                f"activation: gelu or swiglu, or mlp_impl: torch.", ("mlp_impl", "activation"))
    if activation == "swiglu" and use_bias_in_mlp:
        return ("mlp_impl: quack fuses the SwiGLU MLP without biases, and use_bias_in_mlp is true {where}; set "
                "use_bias_in_mlp: false, or mlp_impl: torch.", ("mlp_impl", "use_bias_in_mlp"))
    if precision != "bf16":
        return (f"mlp_impl: quack runs in bf16, and this run is {precision} {{where}}; set bf16: {{enabled: true}}, or "
                f"mlp_impl: torch.", ("mlp_impl", "bf16"))
    if zero_stage == 3:
        return ("mlp_impl: quack reads fc1's and fc2's weights in the MLP's own forward, and ZeRO stage 3 gathers a "
                "partitioned weight only for its module's forward {where}; set mlp_impl: torch, or "
                "zero_optimization.stage <= 2.", ("mlp_impl", "zero_optimization"))
    if sequence_parallel:
        return ("mlp_impl: quack does not take sequence_parallel (fc1's input would be gathered whole and kept) "
                "{where}; set sequence_parallel: false, or mlp_impl: torch.", ("mlp_impl", "sequence_parallel"))
    if hidden is not None and width_per_rank is not None and (hidden % 8 or width_per_rank % 8):
        # quack's GEMMs address bf16 operands through TMA, whose strides must be multiples of 16 bytes
        return (f"mlp_impl: quack needs hidden_size ({hidden}) and the MLP width per tensor-parallel rank "
                f"({width_per_rank}) to be multiples of 8 (16-byte rows for its GEMMs) {{where}}; change "
                f"intermediate_size or hidden_size, or set mlp_impl: torch.", ("mlp_impl", "hidden_size"))
    return None


def check_mlp_impl(args: Any, sources: Mapping[str, str]) -> None:
    """ConfigError when `mlp_impl: quack` is set where the fused MLP cannot run (or `mlp_autotune` where it
    does nothing)."""
    model = args.model
    if model.mlp_autotune and model.mlp_impl == "torch":
        raise _fail(sources, "mlp_autotune: true tunes quack's kernels, and mlp_impl is torch {where}; set "
                             "mlp_impl: quack (or leave it unset), or drop mlp_autotune.", "mlp_autotune", "mlp_impl")
    if model.mlp_impl != "quack":
        return
    refusal = fused_mlp_refusal(model.activation, model.use_bias_in_mlp, _precision(args),
                                args.parallel.sequence_parallel and args.parallel.model_parallel_size > 1,
                                args.parallel.zero_optimization.get("stage", 0))
    if refusal is not None:
        raise _fail(sources, refusal[0], *refusal[1])
