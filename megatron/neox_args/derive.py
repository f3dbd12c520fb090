"""Values computed once from the user's sections: the DerivedArgs block.

    world_size          = launcher resources (world_size.py), unless given explicitly
    data_parallel_size  = world_size / (model_parallel_size * max(pipe_parallel_size, 1))
    train_batch_size    = micro * grad_acc * data_parallel_size   (any two given derive the third;
                          only micro given -> grad_acc 1; only train_batch_size given -> grad_acc 1)
    num_kv_heads        = num_kv_heads or num_attention_heads
    intermediate_size   = GPT-NeoX's MLP width rule (resolve_intermediate_size): I = intermediate_size or 4h;
                          gelu/relu/silu: I rounded up to mlp_multiple_of; swiglu: I counts 3x the width
    max_position_embeddings = max_position_embeddings or seq_length
    lr_decay_iters      = lr_decay_iters or train_iters
    warmup_iters        = round(warmup * lr_decay_iters) (shown; the schedule uses warmup * lr_decay_iters
                          unrounded, as GPT-NeoX)
    precision           = bf16 | fp16 | fp32 from the enabled flag of the bf16/fp16 blocks
    padded_vocab_size   = ceil(vocab / (make_vocab_size_divisible_by * tp)) * that multiple (set_vocab_size)

Batch arithmetic errors (nothing given, inconsistent, non-integer) are ConfigErrors raised here.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

from megatron.neox_args.errors import ConfigError, where
from megatron.neox_args.sections import (
    DerivedArgs, LRArgs, ModelArgs, ParallelArgs, PrecisionArgs, TrainingArgs,
)


def resolve_num_kv_heads(model: ModelArgs) -> int:
    """Key/value heads: num_kv_heads, or num_attention_heads when unset (plain multi-head attention)."""
    return model.num_kv_heads if model.num_kv_heads is not None else model.num_attention_heads


GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu", "bilinear", "glu")
"""Activations with a gate branch: act(gate(x)) * up(x) (GPT-NeoX's Gated_Activation)."""


def _round_up(value: int, multiple: int) -> int:
    return multiple * ((value + multiple - 1) // multiple)


def mlp_widths(model: ModelArgs) -> tuple[int, int]:
    """(fc1 output size, fc2 input size) by GPT-NeoX's ParallelMLP rule, m = mlp_multiple_of:

        I = intermediate_size or 4h
        gated (swiglu): f = int(I * 2 / 3) (gate and up together), w = f // 2,
                        f -> round_up(f, 2m), w -> round_up(w, m)
        else:           f = w = round_up(I, m)

    For swiglu the real width is w and f must equal 2w (upstream splits f into gate and up halves); for the
    other activations f must equal w. Llama-2 7B: I = 32768, m = 256 -> f = 22016, w = 11008.
    """
    size = model.intermediate_size if model.intermediate_size is not None else 4 * model.hidden_size
    m = model.mlp_multiple_of
    if model.activation in GATED_ACTIVATIONS:
        fused = int(size * 2 / 3)
        width = fused // 2
        return _round_up(fused, 2 * m), _round_up(width, m)
    width = _round_up(size, m)  # upstream rounds fc1 to 2m and fc2 to m; they differ only for odd sizes at
    return width, width         # m = 1, where its model fails: here both are the width


def resolve_intermediate_size(model: ModelArgs) -> int:
    """The MLP width (per branch for swiglu) by GPT-NeoX's rule, see mlp_widths."""
    return mlp_widths(model)[1]


def resolve_precision(precision: PrecisionArgs) -> str:
    """'bf16' or 'fp16' when that block has `enabled: true`, else 'fp32' (both enabled is a validation error)."""
    if precision.bf16.get("enabled", False):
        return "bf16"
    if precision.fp16.get("enabled", False):
        return "fp16"
    return "fp32"


def optimizer_wrapper_for(precision: PrecisionArgs, parallel: ParallelArgs) -> tuple[str, str, str]:
    """(wrapper, weights dtype, gradient-sum dtype): the optimizer wrapper DeepSpeed builds for these
    settings (megatron/engine/optimizer_kind.py) and the dtypes that chose it."""
    from megatron.engine.optimizer_kind import offloads_optimizer_to_cpu, optimizer_wrapper

    zero = parallel.zero_optimization
    weights = resolve_precision(precision)
    sums = precision.data_types.get("grad_accum_dtype") or weights
    wrapper = optimizer_wrapper(zero.get("stage", 0), weights, sums, offloads_optimizer_to_cpu(zero),
                                max(parallel.pipe_parallel_size, 1) > 1)
    return wrapper, weights, sums


def resolve_free_grad_sums(precision: PrecisionArgs, parallel: ParallelArgs, grad_acc: int) -> bool:
    """free_grad_sums_between_steps resolved: a value the user wrote (the config check refused `true` where
    it cannot act), else on where it lowers the peak: BF16_Optimizer's sums filled by our patches (no
    `bf16.immediate_grad_update`), one micro-batch per step, no pipeline (whose engine was not measured)."""
    if precision.free_grad_sums_between_steps is not None:
        return precision.free_grad_sums_between_steps
    from megatron.engine.optimizer_kind import BF16

    try:
        wrapper = optimizer_wrapper_for(precision, parallel)[0]
    except ValueError:  # no wrapper for this mix: the config check names it
        return False
    return (wrapper == BF16 and not precision.bf16.get("immediate_grad_update") and grad_acc == 1
            and max(parallel.pipe_parallel_size, 1) == 1)


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, model_parallel_size: int) -> int:
    """Round vocab_size up to a multiple of make_vocab_size_divisible_by * model_parallel_size."""
    multiple = make_vocab_size_divisible_by * model_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


def resolve_data_parallel_size(world_size: int, parallel: ParallelArgs, sources: Mapping[str, str]) -> int:
    """world_size / (tp * pp); a remainder is a ConfigError."""
    tp, pp = parallel.model_parallel_size, max(parallel.pipe_parallel_size, 1)
    if world_size < 1 or world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world_size {world_size} is not divisible by model_parallel_size {tp} x pipe_parallel_size {pp} "
            f"= {tp * pp} {where(sources, 'model_parallel_size', 'pipe_parallel_size')}; tp x pp x dp must equal "
            f"the world size, and dp = {world_size} / ({tp} x {pp}) = {world_size / (tp * pp):g} is not a whole "
            f"number. Use a world size (num_gpus x nodes) that is a multiple of {tp * pp}, or lower "
            f"model_parallel_size or pipe_parallel_size.",
            key="model_parallel_size",
        )
    return world_size // (tp * pp)


def resolve_batch(training: TrainingArgs, dp: int, sources: Mapping[str, str]) -> tuple[int, int, int]:
    """(train_batch_size, micro, grad_acc) with train_batch_size = micro * grad_acc * dp."""
    micro, acc, total = (training.train_micro_batch_size_per_gpu, training.gradient_accumulation_steps,
                         training.train_batch_size)
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    given = f"train_batch_size={total}, train_micro_batch_size_per_gpu={micro}, " \
            f"gradient_accumulation_steps={acc}, data_parallel_size={dp} {where(sources, *keys)}"
    if micro is None and total is None:
        raise ConfigError(
            f"no batch size is set ({given}). Set train_micro_batch_size_per_gpu (and optionally "
            f"gradient_accumulation_steps), or train_batch_size; train_batch_size = micro x grad_acc x "
            f"data_parallel_size.", key="train_micro_batch_size_per_gpu")
    if micro is not None and acc is not None:
        expected = micro * acc * dp
        if total is not None and total != expected:
            raise ConfigError(
                f"the batch sizes disagree: train_batch_size must equal train_micro_batch_size_per_gpu x "
                f"gradient_accumulation_steps x data_parallel_size = {micro} x {acc} x {dp} = {expected}, "
                f"but it is {total} ({given}). Remove train_batch_size (it is derived) or fix one of them.",
                key="train_batch_size")
        return expected, micro, acc
    if micro is not None:  # micro and maybe total
        if total is None:
            return micro * dp, micro, 1
        if total % (micro * dp) != 0:
            raise ConfigError(
                f"train_batch_size {total} is not a multiple of train_micro_batch_size_per_gpu x "
                f"data_parallel_size = {micro} x {dp} = {micro * dp} ({given}); gradient_accumulation_steps "
                f"would not be a whole number. Make train_batch_size a multiple of {micro * dp}.",
                key="train_batch_size")
        return total, micro, total // (micro * dp)
    acc = 1 if acc is None else acc  # total given, micro not
    if total % (acc * dp) != 0:
        raise ConfigError(
            f"train_batch_size {total} is not a multiple of gradient_accumulation_steps x data_parallel_size "
            f"= {acc} x {dp} = {acc * dp} ({given}); train_micro_batch_size_per_gpu would not be a whole "
            f"number. Make train_batch_size a multiple of {acc * dp}, or set train_micro_batch_size_per_gpu.",
            key="train_batch_size")
    return total, total // (acc * dp), acc


def derive(model: ModelArgs, parallel: ParallelArgs, lr: LRArgs, precision: PrecisionArgs,
           training: TrainingArgs, world_size: int, sources: Mapping[str, str],
           vocab_size: Optional[int] = None) -> DerivedArgs:
    """Compute the DerivedArgs block (vocab sizes only when vocab_size is known)."""
    dp = resolve_data_parallel_size(world_size, parallel, sources)
    total, micro, acc = resolve_batch(training, dp, sources)
    decay_iters = lr.lr_decay_iters if lr.lr_decay_iters is not None else training.train_iters
    derived = DerivedArgs(
        world_size=world_size,
        data_parallel_size=dp,
        train_batch_size=total,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=acc,
        num_kv_heads=resolve_num_kv_heads(model),
        intermediate_size=resolve_intermediate_size(model),
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        lr_decay_iters=decay_iters,
        warmup_iters=round(lr.warmup * decay_iters),
        precision=resolve_precision(precision),
        free_grad_sums=resolve_free_grad_sums(precision, parallel, acc),
    )
    if vocab_size is not None:
        derived.vocab_size = vocab_size
        derived.padded_vocab_size = pad_vocab_size(vocab_size, model.make_vocab_size_divisible_by,
                                                   parallel.model_parallel_size)
    return derived
