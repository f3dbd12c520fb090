"""Build everything a run needs, in order, from the resolved NeoXArgs (called by train.py on every rank).

    distributed (nccl on GPU, gloo on CPU) -> parallel groups -> seeds -> tokenizer (vocab size)
    -> model -> optimizer + LR schedule
    -> megatron.engine.build_engine (deepspeed.initialize and the DeepSpeed fixes) -> resume
    -> data iterators at the resumed position -> logger, meter
(the data loader builds the bundled corpus on first use when the config names it)
"""

from __future__ import annotations

import torch

from megatron.checkpointing.resume import TrainProgress, load_checkpoint


def init_parallel(args):
    """Distributed init, tensor/pipeline/data groups and seeds; returns `(device_type, ParallelState)`."""
    from megatron.engine.distributed import init_distributed
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
    from megatron.training.device_defaults import model_args_with, resolve_for_args

    choices = resolve_for_args(args, device_type)
    if choices.reasons and parallel.rank == 0:
        print("device defaults: " + "; ".join(choices.reasons), flush=True)
    if parallel.pp_size > 1:
        return build_pipeline_stage(args, parallel, choices), False
    model = GPTModel(model_args_with(args.model, choices), args.derived, parallel, precision=args.derived.precision,
                     checkpoint_activations=args.training.checkpoint_activations,
                     checkpoint_num_layers=args.training.checkpoint_num_layers,
                     partition_activations=args.training.partition_activations,
                     checkpoint_in_cpu=args.training.checkpoint_in_cpu,
                     recompute_modules=tuple(args.training.recompute_modules),
                     checkpoint_keep_attention=args.training.checkpoint_keep_attention,
                     torch_compile=choices.torch_compile,
                     compile_mode=args.training.torch_compile_mode, init_seed=args.training.seed)
    sum_sp_grads_per_step = False
    if parallel.sequence_parallel and parallel.tp_size > 1:
        zero_stage = args.parallel.zero_optimization.get("stage", 0)
        if grad_sync_mode(zero_stage, args.derived.precision) == "hooks":
            register_sequence_parallel_grad_hooks(model, parallel)
        else:
            sum_sp_grads_per_step = True
    return model, sum_sp_grads_per_step


def build_pipeline_stage(args, parallel, choices):
    """This rank's pipeline stage (megatron/model/pipeline.py) with the device defaults `choices`. The
    pipeline engine runs backward and the optimizer step in one call, so sequence-parallel gradients are
    always summed by tensor hooks."""
    from megatron.model.pipeline import build_pipeline_model
    from megatron.mpu import register_sequence_parallel_grad_hooks
    from megatron.training.device_defaults import model_args_with

    module = build_pipeline_model(model_args_with(args.model, choices), args.derived, parallel,
                                  precision=args.derived.precision,
                                  partition_method=args.parallel.pipe_partition_method,
                                  checkpoint_activations=args.training.checkpoint_activations,
                                  checkpoint_num_layers=args.training.checkpoint_num_layers,
                                  partition_activations=args.training.partition_activations,
                                  torch_compile=choices.torch_compile,
                                  compile_mode=args.training.torch_compile_mode, init_seed=args.training.seed)
    if parallel.sequence_parallel and parallel.tp_size > 1:
        register_sequence_parallel_grad_hooks(module, parallel)
    return module


def build_step(args, model, parallel):
    """The step function the trainer's loop calls (megatron/engine/steps.py)."""
    from megatron.engine.steps import PipelineStep

    return PipelineStep(model, parallel) if parallel.pp_size > 1 else None


def _agreed(problem: str | None, lock=None) -> None:
    """Raise CheckpointError on every rank when some rank has a problem (releasing `lock`)."""
    from megatron.checkpointing.layout import CheckpointError
    from megatron.mpu.checks import first_error_message

    problem = first_error_message(problem)
    if problem:
        if lock is not None:
            lock.release()
        raise CheckpointError(problem)


def take_save_dir_lock(args, rank: int):
    """Rank 0 takes the save directory's lock (`checkpointing.lock`; the kernel drops it when the process
    ends); a busy directory stops every rank. Returns the lock on rank 0, else None."""
    from megatron.checkpointing.layout import CheckpointError
    from megatron.checkpointing.lock import SaveDirLock

    lock, problem = None, None
    if rank == 0 and args.checkpoint.save:
        try:
            lock = SaveDirLock(args.checkpoint.save).acquire()
            if lock.stale_message():
                print(lock.stale_message(), flush=True)
        except (CheckpointError, OSError) as err:
            problem = str(err)
    _agreed(problem)
    return lock


def check_save_dir(args, rank: int, start_iteration: int, lock) -> None:
    """Rank 0, holding the lock, applies `checkpointing.save_dir.claim_save_dir` (no fresh run over
    checkpoints unless overwrite_checkpoints; `latest` never moves back); the verdict stops every rank."""
    from megatron.checkpointing.layout import CheckpointError
    from megatron.checkpointing.save_dir import claim_save_dir

    problem = None
    if rank == 0 and args.checkpoint.save:
        try:
            note = claim_save_dir(args.checkpoint, start_iteration)
            if note:
                print(note, flush=True)
        except (CheckpointError, OSError) as err:
            problem = str(err)
    _agreed(problem, lock)


def build_and_train(args) -> dict:
    """The whole run on this rank; returns the trainer's final values."""
    from megatron.data import build_train_valid_test_data_iterators
    from megatron.engine import build_engine
    from megatron.data.doc_masks import DocumentMasking
    from megatron.logging import MetricsLogger
    from megatron.tokenizer import build_tokenizer
    from megatron.training.metrics import ThroughputMeter
    from megatron.training.trainer import Trainer

    from megatron.mpu.checks import host_group
    from megatron.training.preemption import Preemption

    device_type, parallel = init_parallel(args)
    host_group()  # created on every rank before any host-side flag is agreed on
    rank = torch.distributed.get_rank()
    lock = take_save_dir_lock(args, rank)
    tokenizer = build_tokenizer(args.tokenizer)
    args.set_vocab_size(tokenizer.vocab_size)
    from megatron.training.memory_estimate import check_run_memory

    check_run_memory(args, device_type)  # ConfigError with the numbers when the run cannot fit

    model, sum_sp_grads_per_step = build_model(args, parallel, device_type)
    engine = build_engine(args, model, device_type, parallel)

    progress = TrainProgress()
    if args.checkpoint.load:
        progress = load_checkpoint(engine, args)
    check_save_dir(args, rank, progress.iteration, lock)

    iterators = build_train_valid_test_data_iterators(
        args.data, args.training, args.derived, args.model.seq_length, parallel,
        consumed_train_samples=progress.consumed_train_samples,
        consumed_valid_samples=progress.consumed_valid_samples, seed=args.training.seed,
        masking=DocumentMasking(tokenizer.eod, args.data.reset_attention_mask, args.data.reset_position_ids,
                                args.data.eod_mask_loss))

    logger = MetricsLogger(args.logging, args.logging.log_dir, rank, args.to_dict())
    meter = ThroughputMeter.for_run(args, device_type)
    preemption = Preemption()
    trainer = Trainer(args, engine, model, parallel, iterators, logger, meter, progress,
                      sum_sequence_parallel_grads_per_step=sum_sp_grads_per_step,
                      step=build_step(args, model, parallel), preemption=preemption)
    # from here on SIGTERM/SIGINT stop the run after the current step and a save (before, they end it at once:
    # nothing is trained yet)
    preemption.install()
    try:
        final = trainer.train()
    finally:
        preemption.uninstall()
        if lock is not None:
            lock.release()
    # leave no collective or communication thread running when the process exits
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return final
