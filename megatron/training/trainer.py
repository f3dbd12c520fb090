"""The training loop: micro-batches through the DeepSpeed engine, evaluation, logging, checkpoints.

One iteration = one optimizer step = `gradient_accumulation_steps` micro-batches on every data-parallel
rank. DeepSpeed scales each micro-batch loss by 1/grad_acc, averages gradients over the data-parallel group
at the accumulation boundary, clips, steps the optimizer and the LR schedule.

The step never waits on the device: losses are summed on the device and read (one all-reduce over the
data-parallel group, one host copy) only every `log_interval` iterations.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megatron.checkpointing.resume import TrainProgress, save_checkpoint
from megatron.mpu.grads import allreduce_sequence_parallel_grads


def unclipped_grad_norm(model: torch.nn.Module, parallel) -> torch.Tensor:
    """L2 norm of the full (all tensor ranks) gradient, before clipping; a device scalar.

    Tensor-parallel shards count on every rank, replicated parameters on tensor rank 0 only, then the
    squares are summed over the tensor group. Gradients are already averaged over data parallel here.
    """
    squares = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for param in model.parameters():
        if param.grad is None:
            continue
        if getattr(param, "tensor_model_parallel", False) or parallel.tp_rank == 0:
            squares += param.grad.detach().float().pow(2).sum()
    if dist.is_initialized() and parallel.tp_size > 1:
        dist.all_reduce(squares, group=parallel.tp_group)
    return squares.sqrt()


class Trainer:
    def __init__(self, args, engine, model, parallel, iterators, logger, meter, progress: TrainProgress,
                 sum_sequence_parallel_grads_per_step: bool = False):
        self.args = args
        self.engine = engine
        self.model = model  # the GPTModel inside the engine (its parameters: SP grad sums, grad norm)
        self.parallel = parallel
        self.train_iter, self.valid_iter, self.test_iter = iterators
        self.logger = logger
        self.meter = meter
        self.progress = progress
        self.device = engine.device
        self.grad_acc = args.derived.gradient_accumulation_steps
        self.global_batch = args.derived.train_batch_size
        self._loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        self._loss_count = 0
        self._fp32_grad_norm = None
        # Under SP, in fp32 at ZeRO stage 0, the norm/bias grads are summed over the tensor group once per
        # step here; otherwise tensor hooks registered at build time do it (see megatron/mpu/grads.py).
        self.sum_sequence_parallel_grads_per_step = sum_sequence_parallel_grads_per_step

    # ----------------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        batch = self._to_device(batch)
        # the model returns the scalar loss itself (fused output projection + cross entropy by default),
        # so the [b, s, vocab/tp] logits never leave it
        return self.engine(batch["tokens"], batch["labels"], batch["loss_mask"])

    def train_step(self, measure_grad_norm: bool = False) -> None:
        """One optimizer step over grad_acc micro-batches."""
        self.engine.train()
        for micro in range(self.grad_acc):
            loss = self._forward_loss(next(self.train_iter))
            self.engine.backward(loss)
            if micro == self.grad_acc - 1 and self.sum_sequence_parallel_grads_per_step:
                allreduce_sequence_parallel_grads(self.model, self.parallel)
            if measure_grad_norm and micro == self.grad_acc - 1 and not self._engine_tracks_grad_norm():
                self._fp32_grad_norm = unclipped_grad_norm(self.model, self.parallel)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            self._loss_sum += loss.detach().float()
            self._loss_count += 1
        self.progress.iteration += 1
        self.progress.consumed_train_samples += self.global_batch

    # ----------------------------------------------------------------------------------------------------
    def _dp_mean(self, value: torch.Tensor) -> float:
        """Average a device scalar over the data-parallel group and copy it to the host."""
        value = value.detach().clone()
        if dist.is_initialized() and self.parallel.dp_size > 1:
            dist.all_reduce(value, group=self.parallel.dp_group)
            value /= self.parallel.dp_size
        return float(value)

    def _engine_tracks_grad_norm(self) -> bool:
        """DeepSpeed records the norm itself with bf16/fp16 or ZeRO; plain fp32 clipping discards it."""
        engine = self.engine
        return engine.bfloat16_enabled() or engine.fp16_enabled() or engine.zero_optimization()

    def _grad_norm(self):
        norm = self.engine.get_global_grad_norm() if self._engine_tracks_grad_norm() else self._fp32_grad_norm
        return None if norm is None else float(norm)

    def _skipped_steps(self) -> int:
        """Optimizer steps not applied: fp16 loss-scale overflows (DeepSpeed's count) plus the non-finite
        gradient norms that the sync-free bf16 step skipped on the device (bf16_optimizer_patches)."""
        from megatron.training.bf16_optimizer_patches import nonfinite_steps

        return self.engine.skipped_steps + nonfinite_steps(self.engine.optimizer)

    def _log_train(self, step_seconds: float) -> None:
        loss = self._dp_mean(self._loss_sum / max(self._loss_count, 1))
        record = {
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "grad_norm": self._grad_norm(),
            "skipped_steps": self._skipped_steps(),
            "consumed_samples": self.progress.consumed_train_samples,
        }
        record.update(self.meter.update(self.progress.iteration, step_seconds))
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            record["static_mem_gib"] = self._static_memory / 2**30
        self.logger.log_train(self.progress.iteration, record)
        self._loss_sum.zero_()
        self._loss_count = 0

    # ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, iterator, name: str = "valid") -> float | None:
        if iterator is None:
            return None
        self.engine.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for _ in range(self.args.training.eval_iters):
            for _ in range(self.grad_acc):
                total += self._forward_loss(next(iterator)).float()
                if name == "valid":
                    self.progress.consumed_valid_samples += self.args.derived.train_micro_batch_size_per_gpu * \
                        self.parallel.dp_size
        loss = self._dp_mean(total / (self.args.training.eval_iters * self.grad_acc))
        self.logger.log_eval(self.progress.iteration, loss, math.exp(min(loss, 50.0)), name=name)
        self.engine.train()
        return loss

    def _should_save(self) -> bool:
        factor = self.args.checkpoint.checkpoint_factor
        return bool(self.args.checkpoint.save and factor and self.progress.iteration % factor == 0)

    def save(self) -> None:
        tag = save_checkpoint(self.engine, self.args, self.progress)
        self.logger.info(f"saved checkpoint {self.args.checkpoint.save}/{tag}")

    # ----------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run until train_iters; returns the last logged values (for tests and callers)."""
        training = self.args.training
        log_interval = self.args.logging.log_interval
        last_saved = None
        # weights, optimizer states and gradient buffers, before any activation exists
        self._static_memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        interval_start = time.perf_counter()
        steps_in_interval = 0
        while self.progress.iteration < training.train_iters:
            it = self.progress.iteration + 1
            self.train_step(measure_grad_norm=it % log_interval == 0 or it == training.train_iters)
            steps_in_interval += 1
            if it % log_interval == 0 or it == training.train_iters:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - interval_start
                self._log_train(elapsed / steps_in_interval)
                interval_start = time.perf_counter()
                steps_in_interval = 0
            if training.eval_interval and it % training.eval_interval == 0 and it < training.train_iters:
                self.evaluate(self.valid_iter)
            if self._should_save():
                self.save()
                last_saved = it
        final = {"valid_loss": self.evaluate(self.valid_iter)}
        if self.args.checkpoint.save and last_saved != self.progress.iteration:
            self.save()
        self.logger.close()
        return final
