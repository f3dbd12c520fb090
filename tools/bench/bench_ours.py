"""Our side of the benchmark: the real training code path, one process, world size 1.

    NeoXArgs (size config + overrides) -> init_distributed -> initialize_model_parallel(1)
    -> model_parallel_seed -> GPTModel -> build_engine (DeepSpeed, our optimizer and LR schedule)
    -> build_train_valid_test_data_iterators (synthetic mmap dataset) -> Trainer.train_step

exactly as `megatron.training.setup.build_and_train` wires it, minus the tokenizer (the vocabulary is
set directly), checkpoint loading and the metrics logger (a no-op stand-in: train_step never logs).
"""

from __future__ import annotations

import os

import torch

from bench_config import describe_ours
from bench_timing import find_host_syncs, measure


class NullLogger:
    """The methods of `megatron.logging.MetricsLogger` the Trainer may call, doing nothing."""

    def log_train(self, iteration, record):
        pass

    def log_eval(self, iteration, loss, perplexity, name="valid"):
        pass

    def info(self, message):
        pass

    def close(self):
        pass


def single_process_env(master_port: int) -> None:
    """The launcher's environment for one rank, where unset."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(master_port)}.items():
        os.environ.setdefault(key, value)


def run_ours(spec: dict, args) -> dict:
    """Build our trainer for `spec` (resolved NeoXArgs `args`) and time `Trainer.train_step`.

    Returns the measurement (bench_timing.measure) plus tokens per step, parameter count and notes.
    """
    from megatron.checkpointing.resume import TrainProgress
    from megatron.data import build_train_valid_test_data_iterators
    from megatron.model import GPTModel
    from megatron.mpu import initialize_model_parallel, register_sequence_parallel_grad_hooks
    from megatron.mpu.grads import grad_sync_mode
    from megatron.mpu.random import model_parallel_seed
    from megatron.training.metrics import ThroughputMeter
    from megatron.training.setup import build_engine, init_distributed
    from megatron.training.trainer import Trainer

    single_process_env(spec.get("master_port", 29511))
    device_type = init_distributed()
    if device_type != spec["device"]:
        raise RuntimeError(f"init_distributed chose {device_type} but the benchmark asked for {spec['device']}")
    parallel = initialize_model_parallel(args.parallel.model_parallel_size,
                                         max(args.parallel.pipe_parallel_size, 1),
                                         sequence_parallel=args.parallel.sequence_parallel)
    model_parallel_seed(args.training.seed, parallel)
    model = GPTModel(args.model, args.derived, parallel, precision=args.derived.precision,
                     checkpoint_activations=args.training.checkpoint_activations,
                     checkpoint_num_layers=args.training.checkpoint_num_layers,
                     torch_compile=args.training.torch_compile)
    sum_sp_grads_per_step = False
    if parallel.sequence_parallel and parallel.tp_size > 1:
        if grad_sync_mode(args.parallel.zero_optimization.get("stage", 0)) == "hooks":
            register_sequence_parallel_grad_hooks(model, parallel)
        else:
            sum_sp_grads_per_step = True
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(args, model, device_type, parallel)
    iterators = build_train_valid_test_data_iterators(args.data, args.training, args.derived,
                                                      args.model.seq_length, parallel, seed=args.training.seed)
    meter = ThroughputMeter.for_run(args, device_type)
    trainer = Trainer(args, engine, model, parallel, iterators, NullLogger(), meter, TrainProgress(),
                      sum_sequence_parallel_grads_per_step=sum_sp_grads_per_step)

    result = measure(trainer.train_step, spec["warmup"], spec["steps"], spec["device"])
    if spec.get("sync_debug"):
        result["host_syncs"] = find_host_syncs(trainer.train_step, spec["device"])
    result.update({
        "tokens_per_step": args.derived.train_batch_size * args.model.seq_length,
        "params": n_params,
        "notes": describe_ours(args),
    })
    del trainer, iterators, engine, model
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result
