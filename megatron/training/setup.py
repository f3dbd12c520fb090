"""Build everything a run needs, in order, from the resolved NeoXArgs (called by train.py on every rank).

    distributed (nccl on GPU, gloo on CPU) -> parallel groups -> seeds -> tokenizer (vocab size)
    -> model -> optimizer + LR schedule
    -> deepspeed.initialize -> resume -> data iterators at the resumed position -> logger, meter
(the data loader builds the bundled corpus on first use when the config names it)
"""

from __future__ import annotations

import os

import torch

from megatron.checkpointing.resume import TrainProgress, load_checkpoint


def init_distributed() -> str:
    """Start torch.distributed through DeepSpeed from the launcher's environment; returns the device type."""
    import deepspeed

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    if not use_cuda:
        release_cpu_shm_names()
    return "cuda" if use_cuda else "cpu"


def cpu_shm_segment_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce op creates for `rank` (name set in its shm.cpp)."""
    return "/dev/shm/deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)


def release_cpu_shm_names() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    On CPU, when all ranks share a node, DeepSpeed maps a 66 MB /dev/shm segment per rank (named by
    address, port and rank) and never unlinks it: each run leaks 66 MB x ranks of RAM-backed tmpfs until
    the machine runs out (a test suite of ~100 launches filled 23 GB). Every rank maps all peers'
    segments inside `init_distributed`, so after a barrier the names can go; the mappings stay valid
    and the memory is freed when the last process exits, even on a crash.
    """
    import torch.distributed as dist

    dist.barrier()
    try:
        os.unlink(cpu_shm_segment_path(dist.get_rank()))
    except FileNotFoundError:  # no shm op (ranks on several nodes, or the op is not built)
        pass


def build_engine(args, model, device_type: str, parallel):
    import deepspeed

    from megatron.training import fp16_optimizer_init
    from megatron.training.lr_schedule import WarmupDecayLR
    from megatron.training.optimizer import build_optimizer

    optimizer = build_optimizer(model, args.optimizer, args.parallel.zero_optimization, device_type)
    scheduler = WarmupDecayLR(optimizer, max_lr=args.optimizer.lr, min_lr=args.lr.min_lr,
                              warmup_iters=args.derived.warmup_iters, decay_iters=args.derived.lr_decay_iters,
                              decay_style=args.lr.lr_decay_style)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=args.deepspeed_config(), mpu=parallel.deepspeed_mpu())
    skip_allreduce_without_replicas(engine, parallel)
    if fp16_optimizer_init.needs_reset(engine.optimizer):
        # DeepSpeed took an Adam step with zero gradients to build the states (off-by-one bias correction)
        fp16_optimizer_init.reset_initialization_step(engine.optimizer)
    if type(engine.optimizer).__name__ == "BF16_Optimizer":
        from megatron.training import bf16_optimizer_patches

        # the same gradient sums with one multi-tensor copy or add per micro-batch, and a step that never
        # waits for the device (the skip on a non-finite norm happens inside the fused AdamW kernel)
        bf16_optimizer_patches.install()
    return engine


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
    return True


def init_parallel(args):
    """Distributed init, tensor/pipeline/data groups and seeds; returns `(device_type, ParallelState)`."""
    from megatron.mpu import initialize_model_parallel
    from megatron.mpu.random import model_parallel_seed

    device_type = init_distributed()
    parallel = initialize_model_parallel(args.parallel.model_parallel_size,
                                         max(args.parallel.pipe_parallel_size, 1),
                                         sequence_parallel=args.parallel.sequence_parallel)
    model_parallel_seed(args.training.seed, parallel)
    return device_type, parallel


def build_model(args, parallel, device_type: str):
    """The GPTModel, with the sequence-parallel gradient sums set up for the ZeRO stage in use, and the
    unset `torch_compile` / `sdpa_backend` chosen for `device_type` (device_defaults.py, printed on rank 0).

    Returns `(model, sum_sp_grads_per_step)`: True when the trainer must sum the sequence-parallel
    gradients once per step (ZeRO stage 0); with ZeRO >= 1 tensor hooks do it (megatron/mpu/grads.py).
    """
    from megatron.model import GPTModel
    from megatron.mpu import register_sequence_parallel_grad_hooks
    from megatron.mpu.grads import grad_sync_mode
    from megatron.training.device_defaults import model_args_with, resolve_device_defaults

    choices = resolve_device_defaults(args.model, args.training, device_type, args.derived.precision)
    if choices.reasons and parallel.rank == 0:
        print("device defaults: " + "; ".join(choices.reasons), flush=True)
    model = GPTModel(model_args_with(args.model, choices), args.derived, parallel, precision=args.derived.precision,
                     checkpoint_activations=args.training.checkpoint_activations,
                     checkpoint_num_layers=args.training.checkpoint_num_layers,
                     torch_compile=choices.torch_compile, init_seed=args.training.seed)
    sum_sp_grads_per_step = False
    if parallel.sequence_parallel and parallel.tp_size > 1:
        zero_stage = args.parallel.zero_optimization.get("stage", 0)
        if grad_sync_mode(zero_stage, args.derived.precision) == "hooks":
            register_sequence_parallel_grad_hooks(model, parallel)
        else:
            sum_sp_grads_per_step = True
    return model, sum_sp_grads_per_step


def build_and_train(args) -> dict:
    """The whole run on this rank; returns the trainer's final values."""
    from megatron.data import build_train_valid_test_data_iterators
    from megatron.logging import MetricsLogger
    from megatron.tokenizer import build_tokenizer
    from megatron.training.metrics import ThroughputMeter
    from megatron.training.trainer import Trainer

    device_type, parallel = init_parallel(args)
    tokenizer = build_tokenizer(args.tokenizer)
    args.set_vocab_size(tokenizer.vocab_size)

    model, sum_sp_grads_per_step = build_model(args, parallel, device_type)
    engine = build_engine(args, model, device_type, parallel)

    progress = TrainProgress()
    if args.checkpoint.load:
        progress = load_checkpoint(engine, args)

    iterators = build_train_valid_test_data_iterators(
        args.data, args.training, args.derived, args.model.seq_length, parallel,
        consumed_train_samples=progress.consumed_train_samples,
        consumed_valid_samples=progress.consumed_valid_samples, seed=args.training.seed)

    rank = torch.distributed.get_rank()
    logger = MetricsLogger(args.logging, args.logging.log_dir, rank, args.to_dict())
    meter = ThroughputMeter.for_run(args, device_type)
    trainer = Trainer(args, engine, model, parallel, iterators, logger, meter, progress,
                      sum_sequence_parallel_grads_per_step=sum_sp_grads_per_step)
    final = trainer.train()
    # leave no collective or communication thread running when the process exits
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return final
