"""Building the DeepSpeed engine around our model, optimizer and LR schedule, and what it reports.

    check_deepspeed_version -> build_optimizer + WarmupDecayLR -> deepspeed.initialize
    -> skip_allreduce_without_replicas (dp == 1) -> fp16_optimizer_init (FP16_UnfusedOptimizer)
    -> bf16_optimizer_patches.install (BF16_Optimizer; enable_free_grad_sums with free_grad_sums_between_steps,
       enable_fused_step unless fused_optimizer_step: false, reading the bf16 gradients directly at one
       micro-batch a step and one data-parallel rank)

Nothing outside `megatron/engine` looks at the engine's optimizer wrapper: the trainer asks
`reported_grad_norm` and `skipped_steps` here.
"""

from __future__ import annotations

from megatron.engine.version import check_deepspeed_version


def build_engine(args, model, device_type: str, parallel):
    """`deepspeed.initialize` with our optimizer (megatron/training/optimizer.py) and LR schedule, then the
    engine fixes below; returns the engine."""
    import deepspeed

    from megatron.engine import fp16_optimizer_init
    from megatron.training.lr_schedule import WarmupDecayLR
    from megatron.training.optimizer import build_optimizer

    check_deepspeed_version()
    optimizer = build_optimizer(model, args.optimizer, args.parallel.zero_optimization, device_type)
    scheduler = WarmupDecayLR(optimizer, max_lr=args.optimizer.lr, min_lr=args.lr.min_lr,
                              warmup_iters=args.lr.warmup * args.derived.lr_decay_iters, decay_iters=args.derived.lr_decay_iters,
                              decay_style=args.lr.lr_decay_style)
    pipeline = isinstance(model, deepspeed.PipelineModule)
    if pipeline:  # DeepSpeed takes the pipeline module's own grid as mpu: check that it is our layout
        check_pipeline_grid(model.mpu(), parallel)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=args.deepspeed_config(),
                                           mpu=None if pipeline else parallel.deepspeed_mpu())
    skip_allreduce_without_replicas(engine, parallel)
    if pipeline:
        clip_fp32_pipeline_by_global_norm(engine, parallel)
    if fp16_optimizer_init.needs_reset(engine.optimizer):
        # DeepSpeed took an Adam step with zero gradients to build the states (off-by-one bias correction)
        fp16_optimizer_init.reset_initialization_step(engine.optimizer)
    if type(engine.optimizer).__name__ == "BF16_Optimizer":
        from megatron.engine import bf16_optimizer_patches

        # the same gradient sums with one multi-tensor copy or add per micro-batch, and a step that never
        # waits for the device (the skip on a non-finite norm happens inside the fused AdamW kernel)
        bf16_optimizer_patches.install()
        if args.derived.free_grad_sums:
            enable_free_grad_sums(engine.optimizer, parallel.rank,
                                  chosen=args.precision.free_grad_sums_between_steps is None)
        if args.precision.fused_optimizer_step is not False:
            enable_fused_step(engine.optimizer, parallel.rank, required=args.precision.fused_optimizer_step is True,
                              one_micro_batch=args.derived.gradient_accumulation_steps == 1 and not pipeline)
    elif args.precision.fused_optimizer_step is True:  # the config check let it through: say why it cannot act
        raise RuntimeError(f"fused_optimizer_step: true, but DeepSpeed built {type(engine.optimizer).__name__}, not "
                           f"BF16_Optimizer; set fused_optimizer_step: false or drop the key.")
    return engine


def enable_fused_step(optimizer, rank: int, required: bool, one_micro_batch: bool = False) -> bool:
    """fused_optimizer_step on this BF16_Optimizer where it can run (printed); `required` (the key is `true`):
    a RuntimeError naming the reason where it cannot. `one_micro_batch` (one micro-batch a step, no pipeline):
    the kernel may also read the bf16 gradients themselves, without the fp32 sums, where there is one
    data-parallel rank (bf16_optimizer_patches item 6). Returns whether it is on."""
    from megatron.engine import bf16_optimizer_patches, fused_adamw

    if bf16_optimizer_patches.enable_fused_step(optimizer):
        direct = one_micro_batch and bf16_optimizer_patches.enable_lp_grad_step(optimizer)
        if rank == 0:
            why = "" if required else " (unset: on wherever it can run; set fused_optimizer_step: false for torch's)"
            reads = (", reading the bf16 gradients where autograd left them (one micro-batch a step, one "
                     "data-parallel rank: no fp32 gradient sums)" if direct else "")
            print(f"fused_optimizer_step: AdamW and the bf16 weight copy run as one Triton kernel per parameter "
                  f"group{reads}{why}", flush=True)
        return True
    if required:
        device = optimizer.fp32_groups_flat_partition[0].device
        if device.type != "cuda":
            reason = f"the optimizer runs on {device.type}, the kernel needs CUDA"
        elif fused_adamw._kernel() is None:
            reason = "Triton is not installed"
        else:
            reason = ("the inner optimizer is not torch's AdamW with number hyperparameters (amsgrad, maximize "
                      "and capturable are not supported)")
        raise RuntimeError(f"fused_optimizer_step: true, but it cannot run here: {reason}; set "
                           f"fused_optimizer_step: false or drop the key.")
    return False


def enable_free_grad_sums(optimizer, rank: int, chosen: bool = False) -> None:
    """free_grad_sums_between_steps on this BF16_Optimizer (the config check and derive let only those
    through); `chosen`: the key was unset and resolved to on (the start-up line says how to turn it off)."""
    from megatron.engine import bf16_optimizer_patches

    if not bf16_optimizer_patches.enable_free_grad_sums(optimizer):
        raise RuntimeError("free_grad_sums_between_steps: this BF16_Optimizer does not fill its gradient sums "
                           "through megatron/engine/bf16_optimizer_patches.py (immediate_grad_update or "
                           "expert-parallel folding), so they cannot be freed between steps; set "
                           "free_grad_sums_between_steps: false.")
    if rank == 0:
        gib = sum(f.numel() * f.element_size() for f in optimizer.fp32_groups_gradients_flat) / 2**30
        why = (" (unset: on at one micro-batch per step; set free_grad_sums_between_steps: false to keep them)"
               if chosen else "")
        print(f"free_grad_sums_between_steps: the fp32 gradient sums ({gib:.2f} GiB per rank) are handed back "
              f"after each optimizer step and taken again after the next backward{why}", flush=True)


def skip_allreduce_without_replicas(engine, parallel) -> bool:
    """Turn off DeepSpeed's gradient all-reduce when there is one data-parallel replica and the engine
    would only run its generic fallback; returns whether it was turned off.

    With ZeRO stage 0, or stage 1 with BF16_Optimizer (fp32 gradient accumulation), the engine reduces
    gradients in `buffered_allreduce_fallback`: flatten every gradient into buckets, all-reduce them
    over the data-parallel group, scale by 1/dp, copy them back. Over a group of one that is a sum over
    one tensor: a full copy of the gradients three times per step (~6 ms of a 109 ms 410M step on an
    H100), and with BF16_Optimizer a rounding of its fp32 gradient sums to bf16 (DeepSpeed communicates
    in the model's dtype unless `communication_data_type` says otherwise), which skipping removes.
    DeepSpeed's own switch for "no reduction" is the attribute the pipeline engine and a backend-less
    engine set, `enable_backward_allreduce`. ZeRO optimizers with
    their own `reduce_gradients` (stage 1 without BF16_Optimizer) or partitioned gradients (stage >= 2)
    move gradients into their partitions in that call, so it stays on for them.
    """
    if parallel.dp_size != 1:
        return False
    if engine.zero_optimization_partition_gradients() or (
            engine.zero_optimization_stage() >= 1 and hasattr(engine.optimizer, "reduce_gradients")):
        return False
    engine.enable_backward_allreduce = False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):  # the PipelineEngine's own switch
        engine.pipeline_enable_backward_allreduce = False
    return True


FP32_GRAD_NORM = "_megatron_fp32_grad_norm"
_CLIP_EPS = 1e-6  # DeepSpeed's clip_grad_norm_: coefficient max_norm / (norm + eps)


def clip_fp32_pipeline_by_global_norm(engine, parallel) -> bool:
    """Plain fp32 under the pipeline engine: clip by the norm of the whole model's gradient.

    DeepSpeed's fp32 clipping (`clip_fp32_gradients` -> `runtime.utils.clip_grad_norm_` with the pipeline
    grid as mpu) counts a replicated parameter only on the first rank of the pipe x tensor group, so the
    norms, biases and replicated weights of every later stage are left out, and the tied embedding copy is
    not recognized. Ours is `mpu.reductions.grad_norm` (every stage, tensor shards once, the tied copy
    once); the gradients are multiplied by min(1, clip / (norm + 1e-6)) on the device, DeepSpeed's factor.
    The norm is kept as the engine attribute `FP32_GRAD_NORM` for the step function. Returns whether it
    was installed (not with bf16/fp16/ZeRO, whose wrappers compute the norm themselves, correctly).
    """
    import torch

    from megatron.mpu.reductions import grad_norm

    if engine_reports_grad_norm(engine):
        return False

    @torch.no_grad()
    def clip_fp32_gradients():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = grad_norm(params, parallel)
        setattr(engine, FP32_GRAD_NORM, norm)
        coefficient = torch.clamp(engine.gradient_clipping() / (norm + _CLIP_EPS), max=1.0)
        torch._foreach_mul_([p.grad for p in params], coefficient)

    engine.clip_fp32_gradients = clip_fp32_gradients
    return True


def check_pipeline_grid(grid, parallel) -> None:
    """The groups of DeepSpeed's PipelineParallelGrid (what its engine and ZeRO reduce over) hold the same
    ranks as ours; raises RuntimeError naming the group otherwise."""
    theirs = {"data-parallel": sorted(grid.dp_group), "pipeline": sorted(grid.pp_group),
              "tensor-parallel": sorted(grid.slice_group)}
    ours = {"data-parallel": sorted(parallel.dp_ranks), "pipeline": sorted(parallel.pp_ranks),
            "tensor-parallel": sorted(parallel.tp_ranks)}
    for name in theirs:
        if theirs[name] != ours[name]:
            raise RuntimeError(f"rank {parallel.rank}: DeepSpeed's pipeline grid puts {theirs[name]} in this rank's "
                               f"{name} group, megatron.mpu puts {ours[name]}; the two rank layouts must agree.")


def engine_reports_grad_norm(engine) -> bool:
    """DeepSpeed records the norm itself with bf16/fp16 or ZeRO; plain fp32 clipping discards it (the
    trainer then measures it, `megatron.mpu.reductions.grad_norm`)."""
    return engine.bfloat16_enabled() or engine.fp16_enabled() or engine.zero_optimization()


def reported_grad_norm(engine):
    """The unclipped global gradient norm of the last step as DeepSpeed's wrapper recorded it (a float,
    a device scalar, or None); only where `engine_reports_grad_norm(engine)`."""
    return engine.get_global_grad_norm()


def skipped_steps(engine) -> int:
    """Optimizer steps not applied: fp16 loss-scale overflows (DeepSpeed's count) plus the non-finite
    gradient norms that the sync-free bf16 step skipped on the device (bf16_optimizer_patches)."""
    from megatron.engine.bf16_optimizer_patches import nonfinite_steps

    return engine.skipped_steps + nonfinite_steps(engine.optimizer)
