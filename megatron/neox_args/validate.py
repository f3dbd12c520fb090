"""Consistency checks on type-checked sections, run before launch.

Each failure is a ConfigError naming the keys, their values, the file(s) they came from and the fix.
Data and tokenizer checks (which touch the file system) are in validate_io.py.
"""

from __future__ import annotations

from typing import Any, Mapping

from megatron.neox_args.derive import (GATED_ACTIVATIONS, mlp_widths, optimizer_wrapper_for, resolve_intermediate_size,
                                      resolve_num_kv_heads, resolve_precision)
from megatron.neox_args.errors import ConfigError, where
from megatron.neox_args.validate_long_seq import check_long_seq
from megatron.neox_args.validate_mlp import check_mlp_impl

_POSITIVE_INTS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
              "seq_length", "max_position_embeddings", "rotary_emb_base", "make_vocab_size_divisible_by",
              "mlp_multiple_of", "sliding_window_width", "mlp_chunk_size"),
    "parallel": ("model_parallel_size",),
    "lr": ("lr_decay_iters",),
    "training": ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "train_iters", "eval_interval", "checkpoint_num_layers"),
    "checkpoint": ("checkpoint_factor", "keep_last_n_checkpoints"),
    "logging": ("log_interval",),
    "launcher": ("num_gpus",),
}
"""Fields that must be >= 1 when set (None stays allowed where the annotation is Optional)."""

_NON_NEGATIVE = {
    "parallel": ("pipe_parallel_size",),
    "optimizer": ("weight_decay", "momentum"),
    "lr": ("min_lr",),
    "training": ("gradient_clipping", "eval_iters", "seed", "max_consecutive_nonfinite_steps"),
    "data": ("num_workers",),
}
"""Fields that must be >= 0."""

_POSITIVE_FLOATS = {"model": ("layernorm_epsilon", "rms_norm_epsilon", "init_method_std"),
                    "optimizer": ("eps",)}
"""Fields that must be > 0."""


def fail(sources: Mapping[str, str], message: str, *keys: str) -> ConfigError:
    """A ConfigError whose message is followed by where the keys' values came from."""
    return ConfigError(message.replace("{where}", where(sources, *keys)), key=keys[0] if keys else None,
                       sources=[sources.get(k, "default") for k in keys])


def _check_ranges(args: Any, sources: Mapping[str, str]) -> None:
    for section, names in _POSITIVE_INTS.items():
        for name in names:
            value = getattr(getattr(args, section), name)
            if value is not None and value < 1:
                raise fail(sources, f"{name}: {value} must be a positive integer {{where}}; write 1 or more.", name)
    for section, names in _NON_NEGATIVE.items():
        for name in names:
            value = getattr(getattr(args, section), name)
            if value < 0:
                raise fail(sources, f"{name}: {value} must not be negative {{where}}.", name)
    for section, names in _POSITIVE_FLOATS.items():
        for name in names:
            value = getattr(getattr(args, section), name)
            if not value > 0:
                raise fail(sources, f"{name}: {value} must be greater than 0 {{where}}.", name)
    for name in ("hidden_dropout", "attention_dropout"):
        value = getattr(args.model, name)
        if not 0.0 <= value < 1.0:
            raise fail(sources, f"{name}: {value} must be in [0, 1) {{where}}; 0.0 disables dropout.", name)
    launcher = args.launcher
    if launcher.num_nodes == 0 or launcher.num_nodes < -1:
        raise fail(sources, f"num_nodes: {launcher.num_nodes} must be -1 (every host) or a positive count "
                            f"{{where}}.", "num_nodes")
    if not 1 <= launcher.master_port <= 65535:
        raise fail(sources, f"master_port: {launcher.master_port} is not a TCP port {{where}}; use 1024-65535.",
                   "master_port")


def _check_model(model: Any, sources: Mapping[str, str]) -> None:
    h, heads = model.hidden_size, model.num_attention_heads
    if h % heads != 0:
        raise fail(sources, f"hidden_size: {h} is not divisible by num_attention_heads: {heads} {{where}}; the "
                            f"head size would not be whole. Choose hidden_size a multiple of {heads} (e.g. "
                            f"{(h // heads + 1) * heads}) or num_attention_heads dividing {h}.",
                   "hidden_size", "num_attention_heads")
    kv = resolve_num_kv_heads(model)
    if heads % kv != 0:
        raise fail(sources, f"num_attention_heads: {heads} is not divisible by num_kv_heads: {kv} {{where}}; "
                            f"each key/value head must serve a whole group of query heads. Choose num_kv_heads "
                            f"dividing {heads}.", "num_attention_heads", "num_kv_heads")
    fused, width = mlp_widths(model)
    expected = 2 * width if model.activation in GATED_ACTIVATIONS else width
    if fused != expected:
        raise fail(sources, f"intermediate_size: {model.intermediate_size} with mlp_multiple_of: "
                            f"{model.mlp_multiple_of} and activation: {model.activation} {{where}} gives GPT-NeoX's "
                            f"MLP rule a first projection of {fused} but a width of {width} (it needs "
                            f"{expected}); upstream's model would fail on these shapes too. Choose "
                            f"intermediate_size so that both roundings agree (e.g. a multiple of "
                            f"{6 * model.mlp_multiple_of} for swiglu, of {model.mlp_multiple_of} otherwise).",
                   "intermediate_size", "mlp_multiple_of")
    max_pos = model.max_position_embeddings
    if max_pos is not None and model.seq_length > max_pos:
        raise fail(sources, f"seq_length: {model.seq_length} is longer than max_position_embeddings: {max_pos} "
                            f"{{where}}; raise max_position_embeddings to at least {model.seq_length} or shorten "
                            f"seq_length.", "seq_length", "max_position_embeddings")
    if not 0.0 < model.rotary_pct <= 1.0:
        raise fail(sources, f"rotary_pct: {model.rotary_pct} must be in (0, 1] {{where}}; it is the fraction of "
                            f"each head's dimensions that rotary acts on (1.0 = all, Pythia uses 0.25).",
                   "rotary_pct")
    if model.pos_emb == "rotary":
        head_dim = h // heads
        rotary_dims = int(head_dim * model.rotary_pct)
        if rotary_dims < 2 or rotary_dims % 2 != 0:
            raise fail(sources, f"rotary_pct: {model.rotary_pct} of head size {head_dim} (hidden_size {h} / "
                                f"num_attention_heads {heads}) gives {rotary_dims} rotary dimensions {{where}}; "
                                f"rotary needs an even number >= 2. Choose rotary_pct so that head size x "
                                f"rotary_pct is even.", "rotary_pct", "hidden_size", "num_attention_heads")


def _check_parallel(args: Any, sources: Mapping[str, str]) -> None:
    parallel, model = args.parallel, args.model
    _check_pipeline(parallel, model, sources)
    tp = parallel.model_parallel_size
    for name, value in (("num_attention_heads", model.num_attention_heads),
                        ("num_kv_heads", resolve_num_kv_heads(model)),
                        ("intermediate_size", resolve_intermediate_size(model))):
        if value % tp != 0:
            what = " (resolved)" if getattr(model, name) is None else ""
            raise fail(sources, f"{name}{what}: {value} is not divisible by model_parallel_size: {tp} {{where}}; "
                                f"tensor parallelism splits it evenly over the {tp} ranks. Choose a "
                                f"model_parallel_size dividing {value}, or change {name}.",
                       name, "model_parallel_size")
    if parallel.sequence_parallel:
        if tp < 2:
            raise fail(sources, f"sequence_parallel: true needs model_parallel_size > 1, but it is {tp} {{where}}; "
                                f"set sequence_parallel: false, or model_parallel_size: 2 or more.",
                       "sequence_parallel", "model_parallel_size")
        if model.seq_length % tp != 0:
            raise fail(sources, f"seq_length: {model.seq_length} is not divisible by model_parallel_size: {tp} "
                                f"{{where}}; sequence parallelism splits the sequence evenly over the tensor "
                                f"ranks. Choose seq_length a multiple of {tp}.", "seq_length", "model_parallel_size")
    zero = parallel.zero_optimization
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise fail(sources, f"zero_optimization.stage: {stage!r} must be 0, 1, 2 or 3 {{where}}.",
                   "zero_optimization")


def _check_pipeline(parallel: Any, model: Any, sources: Mapping[str, str]) -> None:
    pp = parallel.pipe_parallel_size
    if pp <= 1:
        return
    if model.num_layers < pp:
        raise fail(sources, f"num_layers: {model.num_layers} is less than pipe_parallel_size: {pp} {{where}}; every "
                            f"pipeline stage needs at least one transformer layer. Set pipe_parallel_size to at most "
                            f"{model.num_layers}, or num_layers to at least {pp}.", "num_layers", "pipe_parallel_size")
    stage = parallel.zero_optimization.get("stage", 0)
    if stage in (2, 3):
        raise fail(sources, f"zero_optimization.stage: {stage} with pipe_parallel_size: {pp} {{where}}: DeepSpeed's "
                            f"pipeline engine does not support ZeRO stage 2 or 3 (it partitions gradients, which the "
                            f"pipeline's gradient accumulation across micro-batches cannot use). Set "
                            f"zero_optimization.stage: 1 (or 0), or pipe_parallel_size: 1.",
                   "zero_optimization", "pipe_parallel_size")


def _check_precision(args: Any, sources: Mapping[str, str]) -> None:
    for name in ("bf16", "fp16"):
        enabled = getattr(args.precision, name).get("enabled", False)
        if not isinstance(enabled, bool):
            raise fail(sources, f"{name}.enabled: {enabled!r} must be true or false {{where}}.", name)
    if args.precision.bf16.get("enabled") and args.precision.fp16.get("enabled"):
        raise fail(sources, "bf16 and fp16 are both enabled {where}; choose one: set `enabled: false` in the "
                            "other block (bf16 needs no loss scaling and is preferred on Ampere or newer).",
                   "bf16", "fp16")
    _check_grad_accum_dtype(args, sources)
    _check_free_grad_sums(args, sources)
    _check_fused_optimizer_step(args, sources)


def _check_free_grad_sums(args: Any, sources: Mapping[str, str]) -> None:
    """free_grad_sums_between_steps: true acts on BF16_Optimizer's own accumulation only (null resolves to
    off elsewhere, derive.resolve_free_grad_sums)."""
    if args.precision.free_grad_sums_between_steps is not True:
        return
    _check_bf16_optimizer(args, sources, "free_grad_sums_between_steps", "frees the fp32 gradient sums")
    if args.precision.bf16.get("immediate_grad_update"):
        raise fail(sources, "free_grad_sums_between_steps: true with bf16.immediate_grad_update {where}: DeepSpeed's "
                            "hooks add each gradient into the sums during backward, so they must exist then; "
                            "drop one of the two.", "free_grad_sums_between_steps", "bf16")


def _check_fused_optimizer_step(args: Any, sources: Mapping[str, str]) -> None:
    """fused_optimizer_step: true acts on BF16_Optimizer's step only (null is off elsewhere; whether the device
    can run the kernel is checked when the engine is built: megatron/engine/build.py)."""
    if args.precision.fused_optimizer_step is True:
        _check_bf16_optimizer(args, sources, "fused_optimizer_step", "fuses the AdamW step and the bf16 weight copy")


def _check_bf16_optimizer(args: Any, sources: Mapping[str, str], key: str, what: str) -> None:
    """`key: true` needs DeepSpeed's BF16_Optimizer; a ConfigError naming what this config gets otherwise."""
    from megatron.engine.optimizer_kind import BF16

    zero = args.parallel.zero_optimization
    wrapper, model_dtype, accum = optimizer_wrapper_for(args.precision, args.parallel)
    if wrapper != BF16:
        raise fail(sources, f"{key}: true {{where}} {what} of DeepSpeed's "
                            f"BF16_Optimizer, but this config gets {wrapper} ({model_dtype} weights, {accum} gradient "
                            f"sums, ZeRO stage {zero.get('stage', 0)}); it needs bf16: {{enabled: true}}, "
                            f"data_types: {{grad_accum_dtype: fp32}}, zero_optimization.stage 1 and the optimizer on "
                            f"the device, or drop the key.", key, "data_types", "zero_optimization")


CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that replay each compiled layer as CUDA graphs."""


def _check_compile_mode(args: Any, sources: Mapping[str, str]) -> None:
    """torch_compile_mode: a mode other than default needs compiled layers; a CUDA-graph mode needs every layer
    forward to run once per micro-batch, before its backward (no pipeline schedule, no recomputation)."""
    training = args.training
    mode = training.torch_compile_mode
    if mode == "default":
        return
    if training.torch_compile is False:
        raise fail(sources, f"torch_compile_mode: {mode} with torch_compile: false {{where}}: the mode is for "
                            f"compiled layers; set torch_compile: true (or leave it unset on CUDA), or drop "
                            f"torch_compile_mode.", "torch_compile_mode", "torch_compile")
    if mode not in CUDAGRAPH_COMPILE_MODES:
        return
    conflicts = []
    if args.parallel.pipe_parallel_size > 1:
        conflicts.append((f"pipe_parallel_size: {args.parallel.pipe_parallel_size} (the pipeline schedule runs "
                          f"several micro-batches' forwards before their backwards)", "pipe_parallel_size"))
    if training.checkpoint_activations:
        conflicts.append(("checkpoint_activations: true (layers run their forward again inside backward)",
                          "checkpoint_activations"))
    if training.recompute_modules:
        conflicts.append((f"recompute_modules: {list(training.recompute_modules)} (parts of each layer run again "
                          f"inside backward)", "recompute_modules"))
    if conflicts:
        what = "; ".join(text for text, _ in conflicts)
        raise fail(sources, f"torch_compile_mode: {mode} {{where}} replays each compiled layer's forward and "
                            f"backward as recorded CUDA graphs, once per micro-batch in that order, which this "
                            f"config breaks: {what}. Use torch_compile_mode: default (or "
                            f"max-autotune-no-cudagraphs), or drop those keys.",
                   "torch_compile_mode", *(key for _, key in conflicts))


GRAD_ACCUM_DTYPES = ("fp32", "bf16", "fp16")


def _check_grad_accum_dtype(args: Any, sources: Mapping[str, str]) -> None:
    data_types = args.precision.data_types
    unknown = sorted(set(data_types) - {"grad_accum_dtype"})
    if unknown:
        raise fail(sources, f"data_types: unknown key(s) {unknown} {{where}}; the block takes grad_accum_dtype "
                            f"(one of {', '.join(GRAD_ACCUM_DTYPES)}).", "data_types")
    accum = data_types.get("grad_accum_dtype")
    if accum is None:
        return
    if accum not in GRAD_ACCUM_DTYPES:
        raise fail(sources, f"data_types.grad_accum_dtype: {accum!r} must be one of {', '.join(GRAD_ACCUM_DTYPES)} "
                            f"{{where}}.", "data_types")
    model_dtype = resolve_precision(args.precision)
    stage = args.parallel.zero_optimization.get("stage", 0)
    if accum != model_dtype and stage == 0:
        raise fail(sources, f"data_types.grad_accum_dtype: {accum} with {model_dtype} weights needs ZeRO stage >= 1 "
                            f"{{where}} (DeepSpeed implements no such mix at zero_optimization.stage 0); set "
                            f"zero_optimization.stage: 1, or drop grad_accum_dtype.", "data_types", "zero_optimization")
    if model_dtype == "fp32" and accum != "fp32":
        raise fail(sources, f"data_types.grad_accum_dtype: {accum} with fp32 weights {{where}} would round the "
                            f"gradients; use fp32 (or drop the key).", "data_types")


def _check_optimizer_and_schedule(args: Any, sources: Mapping[str, str]) -> None:
    betas = args.optimizer.betas
    if (len(betas) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in betas)
            or not all(0.0 <= b < 1.0 for b in betas)):
        raise fail(sources, f"betas: {list(betas)} must be two numbers in [0, 1) {{where}}, e.g. [0.9, 0.95].",
                   "betas")
    if args.optimizer.lr is None:
        raise fail(sources, "no learning rate is set {where}; lr is required (as in GPT-NeoX): write "
                            "`optimizer: {type: Adam, params: {lr: 6.0e-4}}` or `lr: 6.0e-4`.", "lr")
    if args.optimizer.lr < 0:
        raise fail(sources, f"lr: {args.optimizer.lr} must not be negative {{where}}.", "lr")
    if args.optimizer.lr < args.lr.min_lr:
        raise fail(sources, f"lr: {args.optimizer.lr} is below min_lr: {args.lr.min_lr} {{where}}; the schedule "
                            f"decays from lr down to min_lr. Lower min_lr or raise lr.", "lr", "min_lr")
    if not 0.0 <= args.lr.warmup <= 1.0:
        raise fail(sources, f"warmup: {args.lr.warmup} must be in [0, 1] {{where}}; it is a fraction of "
                            f"lr_decay_iters (e.g. 0.01 = 1% of the decay).", "warmup")


DEEPSPEED_KEYS_WRITTEN_HERE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                               "gradient_clipping", "bf16", "fp16", "zero_optimization", "steps_per_print",
                               "wall_clock_breakdown", "timers", "data_types", "communication_data_type",
                               "optimizer", "scheduler", "activation_checkpointing")
"""DeepSpeed config blocks this trainer writes itself (NeoXArgs.deepspeed_config); not allowed in
deepspeed_extra_args."""


def _check_upstream_extras(args: Any, sources: Mapping[str, str]) -> None:
    saves = args.checkpoint.extra_save_iters
    if saves is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in saves):
        raise fail(sources, f"extra_save_iters: {saves!r} must be a list of iterations (integers >= 0) {{where}}, "
                            f"e.g. [0, 1, 2, 4, 8].", "extra_save_iters")
    extra = args.precision.deepspeed_extra_args
    clash = sorted(set(extra) & set(DEEPSPEED_KEYS_WRITTEN_HERE))
    if clash:
        raise fail(sources, f"deepspeed_extra_args sets {clash} {{where}}, which this trainer writes into the "
                            f"DeepSpeed config itself; set them through their own keys (docs/CONFIG.md) and keep "
                            f"only other DeepSpeed blocks (comms_logger, flops_profiler, ...) here.",
                   "deepspeed_extra_args")
    launcher = args.launcher
    if launcher.comment is not None and (launcher.launcher != "slurm" or launcher.deepspeed_slurm):
        how = ("with deepspeed_slurm srun is already running: pass --comment to your own srun"
               if launcher.deepspeed_slurm else "set launcher: slurm (with a hostfile), or remove comment")
        raise fail(sources, f"comment: {launcher.comment!r} is a Slurm job comment, passed to srun only by "
                            f"launcher: slurm {{where}}; {how}.", "comment", "launcher")


def validate_sections(args: Any, sources: Mapping[str, str]) -> None:
    """All checks that need no file system and no derived values (args: NeoXArgs or look-alike)."""
    _check_ranges(args, sources)
    _check_model(args.model, sources)
    _check_parallel(args, sources)
    _check_precision(args, sources)
    _check_optimizer_and_schedule(args, sources)
    _check_upstream_extras(args, sources)
    check_long_seq(args, sources)
    check_mlp_impl(args, sources)
    _check_compile_mode(args, sources)
