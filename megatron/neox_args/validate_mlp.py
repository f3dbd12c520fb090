"""Consistency checks of `mlp_impl: quack` that need no installed package (activation and biases, precision,
ZeRO stage 3, sequence parallelism), at launch. Whether quack imports and a GPU is there is checked when the model is built
(megatron/model/mlp_support.py), so that configs validate on machines without it."""

from __future__ import annotations

from typing import Any, Mapping

from megatron.neox_args.validate_long_seq import _fail, _precision


def check_mlp_impl(args: Any, sources: Mapping[str, str]) -> None:
    """ConfigError when `mlp_impl: quack` is set where the fused GELU MLP cannot run."""
    model = args.model
    if model.mlp_autotune and model.mlp_impl == "torch":
        raise _fail(sources, "mlp_autotune: true tunes quack's kernels, and mlp_impl is torch {where}; set "
                             "mlp_impl: quack (or leave it unset), or drop mlp_autotune.", "mlp_autotune", "mlp_impl")
    if model.mlp_impl != "quack":
        return
    if model.activation not in ("gelu", "swiglu"):
        raise _fail(sources, f"mlp_impl: quack fuses the GELU and SwiGLU MLPs, and activation is "
                             f"{model.activation!r} {{where}}; set activation: gelu or swiglu, or mlp_impl: torch.",
                    "mlp_impl", "activation")
    if model.activation == "swiglu" and model.use_bias_in_mlp:
        raise _fail(sources, "mlp_impl: quack fuses the SwiGLU MLP without biases, and use_bias_in_mlp is true "
                             "{where}; set use_bias_in_mlp: false, or mlp_impl: torch.", "mlp_impl", "use_bias_in_mlp")
    if _precision(args) != "bf16":
        raise _fail(sources, f"mlp_impl: quack runs in bf16, and this run is {_precision(args)} {{where}}; set "
                             f"bf16: {{enabled: true}}, or mlp_impl: torch.", "mlp_impl", "bf16")
    if args.parallel.zero_optimization.get("stage", 0) == 3:
        raise _fail(sources, "mlp_impl: quack reads fc1's and fc2's weights in the MLP's own forward, and ZeRO stage 3 "
                             "gathers a partitioned weight only for its module's forward {where}; set mlp_impl: torch, "
                             "or zero_optimization.stage <= 2.", "mlp_impl", "zero_optimization")
    if args.parallel.sequence_parallel and args.parallel.model_parallel_size > 1:
        raise _fail(sources, "mlp_impl: quack does not take sequence_parallel (fc1's input would be gathered whole "
                             "and kept) {where}; set sequence_parallel: false, or mlp_impl: torch.",
                    "mlp_impl", "sequence_parallel")
