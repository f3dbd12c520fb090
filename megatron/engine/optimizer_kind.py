"""Which DeepSpeed optimizer wrapper will hold the optimizer states of a config.

Optimizer states in a checkpoint load only into the wrapper that wrote them (each has its own layout), so
`checkpointing.resume` compares the saved config's kind with the current one before DeepSpeed reads any
file. The choice below is DeepSpeed 0.19's (`DeepSpeedEngine._do_optimizer_sanity_check` and
`_configure_optimizer`; tests/unit/engine/test_optimizer_kind.py runs DeepSpeed's own method over every
combination and compares):

    ZeRO stage >= 1:
        bf16 weights, fp32 gradient sums, stage 1, optimizer NOT offloaded to the CPU  -> BF16_Optimizer
        otherwise stage 1/2 -> DeepSpeedZeroOptimizer,  stage 3 -> DeepSpeedZeroOptimizer_Stage3
    ZeRO stage 0 (gradient sums in the weights' dtype; other mixes are refused by the config check):
        fp32                                  -> the torch optimizer itself
        bf16 under the pipeline engine        -> BF16_Optimizer
        bf16, fp16                            -> FP16_UnfusedOptimizer (our optimizer is torch's, not
                                                 DeepSpeed's FusedAdam, so never the fused FP16_Optimizer)

`zero_optimization.offload_optimizer.device: cpu` therefore changes the wrapper at stage 1 with bf16 and
fp32 gradient sums (BF16_Optimizer <-> DeepSpeedZeroOptimizer): a resume across that setting is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

TORCH = "torch optimizer"
BF16 = "BF16_Optimizer"
FP16_UNFUSED = "FP16_UnfusedOptimizer"
ZERO_1_2 = "DeepSpeedZeroOptimizer"
ZERO_3 = "DeepSpeedZeroOptimizer_Stage3"


def offloads_optimizer_to_cpu(zero_optimization: dict) -> bool:
    """DeepSpeed's `zero_cpu_offload()`: `offload_optimizer.device` is "cpu" (under ZeRO stage >= 1)."""
    offload = zero_optimization.get("offload_optimizer") or {}
    return zero_optimization.get("stage", 0) > 0 and offload.get("device", "none") == "cpu"


def optimizer_wrapper(stage: int, precision: str, grad_accum_dtype: str, offload_to_cpu: bool,
                      pipeline: bool) -> str:
    """The class name of the wrapper DeepSpeed 0.19 builds (or `TORCH`); see the module docstring."""
    if stage >= 1:
        if precision == "bf16" and grad_accum_dtype == "fp32" and stage == 1 and not offload_to_cpu:
            return BF16
        return ZERO_3 if stage == 3 else ZERO_1_2
    if grad_accum_dtype != precision:
        raise ValueError(f"DeepSpeed has no optimizer wrapper for {precision} weights with {grad_accum_dtype} "
                         f"gradient sums at ZeRO stage 0")
    if precision == "fp32":
        return TORCH
    if precision == "bf16" and pipeline:
        return BF16
    return FP16_UNFUSED


@dataclass(frozen=True)
class OptimizerKind:
    """`wrapper`: the class name (checkpoints load only into the same one); `settings`: what chose it."""

    wrapper: str
    settings: str

    def __str__(self) -> str:
        return f"{self.wrapper} ({self.settings})"


def deepspeed_optimizer_kind(args) -> OptimizerKind:
    """The wrapper DeepSpeed builds for a NeoXArgs, with the settings that chose it."""
    zero = args.parallel.zero_optimization
    stage = zero.get("stage", 0)
    precision = args.derived.precision
    accum = args.precision.data_types.get("grad_accum_dtype") or precision
    offload = offloads_optimizer_to_cpu(zero)
    pipeline = max(args.parallel.pipe_parallel_size, 1) > 1
    wrapper = optimizer_wrapper(stage, precision, accum, offload, pipeline)
    settings = [f"ZeRO stage {stage}", f"{precision} weights", f"{accum} gradient sums"]
    if stage >= 1:
        settings.append("optimizer offloaded to the CPU" if offload else "optimizer on the device")
    if pipeline:
        settings.append("pipeline engine")
    return OptimizerKind(wrapper, ", ".join(settings))
