"""Consistency checks of the long-sequence keys: attention kernel, sliding window, document masking,
MLP chunking and activation offload. Each failure is a ConfigError naming keys, values, files and the fix.

Whether a kernel's package is installed is checked when the model is built
(megatron/model/attention_support.py), so that configs validate on machines without it.
"""

from __future__ import annotations

from typing import Any, Mapping

from megatron.neox_args.errors import ConfigError, where

FA4_HEAD_DIMS = "a multiple of 8 from 8 to 256 (Hopper; Blackwell takes up to 128, or 256)"
RECOMPUTE_MODULES = ("core_attn", "mlp_act")
"""The parts of a layer `recompute_modules` may name."""
INT32_TOKENS = 2**31
"""Variable-length kernels index the packed micro-batch with int32 cumulative lengths."""


def _fail(sources: Mapping[str, str], message: str, *keys: str) -> ConfigError:
    return ConfigError(message.replace("{where}", where(sources, *keys)), key=keys[0] if keys else None,
                       sources=[sources.get(k, "default") for k in keys])


def _precision(args: Any) -> str:
    if args.precision.bf16.get("enabled"):
        return "bf16"
    return "fp16" if args.precision.fp16.get("enabled") else "fp32"


def check_long_seq(args: Any, sources: Mapping[str, str]) -> None:
    """All checks of this module, on type-checked sections (NeoXArgs or look-alike)."""
    model, data, training = args.model, args.data, args.training
    impl = model.attention_impl
    window = model.sliding_window_width
    if impl == "fa4":
        head_dim = model.hidden_size // model.num_attention_heads
        if head_dim % 8 != 0 or not 8 <= head_dim <= 256:
            raise _fail(sources, f"attention_impl: fa4 cannot take head size {head_dim} (hidden_size "
                                 f"{model.hidden_size} / num_attention_heads {model.num_attention_heads}) {{where}}: "
                                 f"FlashAttention-4 needs {FA4_HEAD_DIMS}. Change num_attention_heads or "
                                 f"hidden_size, or set attention_impl: sdpa.",
                        "attention_impl", "hidden_size", "num_attention_heads")
        if _precision(args) == "fp32":
            raise _fail(sources, "attention_impl: fa4 runs in bf16 or fp16 only, and this run is fp32 {where}; "
                                 "set bf16: {enabled: true}, or attention_impl: sdpa.", "attention_impl", "bf16")
        if model.attention_dropout > 0:
            raise _fail(sources, f"attention_impl: fa4 has no attention dropout, but attention_dropout is "
                                 f"{model.attention_dropout} {{where}}; set attention_dropout: 0.0, or "
                                 f"attention_impl: sdpa or flash.", "attention_impl", "attention_dropout")
    if impl in (None, "sdpa") and model.attention_dropout > 0 and (window is not None or data.reset_attention_mask):
        keys = ["attention_dropout", "reset_attention_mask" if data.reset_attention_mask else "sliding_window_width"]
        raise _fail(sources, f"attention_dropout: {model.attention_dropout} with {keys[1]} and attention_impl: "
                             f"sdpa {{where}}: torch's variable-length attention has no dropout; set "
                             f"attention_dropout: 0.0, or attention_impl: flash.", *keys)
    if data.reset_attention_mask:
        micro = training.train_micro_batch_size_per_gpu or 1
        if micro * model.seq_length >= INT32_TOKENS:
            raise _fail(sources, f"reset_attention_mask with train_micro_batch_size_per_gpu {micro} x seq_length "
                                 f"{model.seq_length} = {micro * model.seq_length} tokens {{where}}: variable-length "
                                 f"kernels index a micro-batch with int32 offsets (< 2^31 tokens); lower the "
                                 f"micro-batch or seq_length.", "reset_attention_mask", "seq_length")
    modules = training.recompute_modules
    unknown = sorted(set(modules) - set(RECOMPUTE_MODULES))
    if unknown:
        raise _fail(sources, f"recompute_modules: {list(modules)} has unknown name(s) {unknown} {{where}}; choose "
                             f"from {list(RECOMPUTE_MODULES)}.", "recompute_modules")
    if modules and training.checkpoint_activations:
        raise _fail(sources, f"recompute_modules: {list(modules)} with checkpoint_activations: true {{where}}: full "
                             f"checkpointing recomputes every layer already; drop one of them.",
                    "recompute_modules", "checkpoint_activations")
    if "mlp_act" in modules and training.torch_compile:
        raise _fail(sources, "recompute_modules: [mlp_act] with torch_compile: true {where}: compiled layers "
                             "recompute the MLP activation already; drop mlp_act, or set torch_compile: false.",
                    "recompute_modules", "torch_compile")
    if args.parallel.pipe_parallel_size > 1:
        for key, on in (("reset_attention_mask", data.reset_attention_mask),
                        ("reset_position_ids", data.reset_position_ids),
                        ("checkpoint_in_cpu", training.checkpoint_in_cpu),
                        ("recompute_modules", bool(modules))):
            if on:
                raise _fail(sources, f"{key} with pipe_parallel_size: {args.parallel.pipe_parallel_size} {{where}}: "
                                     f"the pipeline stages do not carry it yet (document fields / offloaded or "
                                     f"selective recomputation are wired for the plain engine only); set "
                                     f"pipe_parallel_size: 1, or drop {key}.", key, "pipe_parallel_size")
    if training.checkpoint_keep_attention:
        if not training.checkpoint_activations:
            raise _fail(sources, "checkpoint_keep_attention: true with checkpoint_activations: false {where}: it is a "
                                 "way of checkpointing; set checkpoint_activations: true, or drop "
                                 "checkpoint_keep_attention.", "checkpoint_keep_attention", "checkpoint_activations")
        for key, bad, setting, fix in (
                ("checkpoint_num_layers", training.checkpoint_num_layers != 1,
                 f"checkpoint_num_layers: {training.checkpoint_num_layers}",
                 "it checkpoints one layer at a time; set checkpoint_num_layers: 1"),
                ("checkpoint_in_cpu", training.checkpoint_in_cpu, "checkpoint_in_cpu: true",
                 "one keeps more on the device, the other moves the layer inputs to the host; choose one"),
                ("pipe_parallel_size", args.parallel.pipe_parallel_size > 1,
                 f"pipe_parallel_size: {args.parallel.pipe_parallel_size}",
                 "the pipeline stages checkpoint whole layers; set pipe_parallel_size: 1 or drop it")):
            if bad:
                raise _fail(sources, f"checkpoint_keep_attention: true with {setting} {{where}}: {fix}.",
                            "checkpoint_keep_attention", key)
    if training.checkpoint_in_cpu and not training.checkpoint_activations:
        raise _fail(sources, "checkpoint_in_cpu: true keeps the checkpointed layer inputs in host memory, but "
                             "checkpoint_activations is false {where}; set checkpoint_activations: true, or "
                             "checkpoint_in_cpu: false.", "checkpoint_in_cpu", "checkpoint_activations")
