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
from bench_timing import host_profile, measure_spec, phase_spans


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
    from megatron.engine import build_engine
    from megatron.training.metrics import ThroughputMeter
    from megatron.training.setup import build_model, init_parallel
    from megatron.training.trainer import Trainer

    single_process_env(spec.get("master_port", 29511))
    device_type, parallel = init_parallel(args)
    if device_type != spec["device"]:
        raise RuntimeError(f"init_distributed chose {device_type} but the benchmark asked for {spec['device']}")
    model, sum_sp_grads_per_step = build_model(args, parallel, device_type)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(args, model, device_type, parallel)
    from megatron.data.doc_masks import DocumentMasking
    from megatron.tokenizer import build_tokenizer

    masking = DocumentMasking(build_tokenizer(args.tokenizer).eod, args.data.reset_attention_mask,
                              args.data.reset_position_ids, args.data.eod_mask_loss)
    iterators = build_train_valid_test_data_iterators(args.data, args.training, args.derived,
                                                      args.model.seq_length, parallel, seed=args.training.seed,
                                                      masking=masking)
    meter = ThroughputMeter.for_run(args, device_type)
    trainer = Trainer(args, engine, model, parallel, iterators, NullLogger(), meter, TrainProgress(),
                      sum_sequence_parallel_grads_per_step=sum_sp_grads_per_step)

    result = measure_spec(trainer.train_step, spec)
    if spec.get("profile"):
        result["phases_ms"] = phase_spans(trainer)
        result["host_profile"] = host_profile(trainer.train_step)
    result.update({
        "tokens_per_step": args.derived.train_batch_size * args.model.seq_length,
        "params": n_params,
        "notes": describe_ours(args, spec["device"]),
    })
    del trainer, iterators, engine, model
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result
