"""Consistency checks of `mlp_impl: quack` that need no installed package (activation, precision, sequence
parallelism), at launch. Whether quack imports and a GPU is there is checked when the model is built
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
    if model.activation != "gelu":
        raise _fail(sources, f"mlp_impl: quack fuses the GELU MLP, and activation is {model.activation!r} {{where}}; "
                             f"set activation: gelu, or mlp_impl: torch.", "mlp_impl", "activation")
    if _precision(args) != "bf16":
        raise _fail(sources, f"mlp_impl: quack runs in bf16, and this run is {_precision(args)} {{where}}; set "
                             f"bf16: {{enabled: true}}, or mlp_impl: torch.", "mlp_impl", "bf16")
    if args.parallel.sequence_parallel and args.parallel.model_parallel_size > 1:
        raise _fail(sources, "mlp_impl: quack does not take sequence_parallel (fc1's input would be gathered whole "
                             "and kept) {where}; set sequence_parallel: false, or mlp_impl: torch.",
                    "mlp_impl", "sequence_parallel")
