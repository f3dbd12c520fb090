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

from megatron.checkpointing.resume import TrainProgress, read_latest_or_none, save_checkpoint
from megatron.engine.build import skipped_steps
from megatron.engine.steps import EngineStep
from megatron.mpu.reductions import data_parallel_mean
from megatron.neox_args.validate import CUDAGRAPH_COMPILE_MODES
from megatron.training.divergence import DivergenceError, DivergenceGuard, all_finite


def save_due(checkpoint, iteration: int) -> bool:
    """Whether to save after `iteration` optimizer steps (0: the initial weights): every checkpoint_factor
    steps, and at each of extra_save_iters (GPT-NeoX's rule); never without `save`."""
    if not checkpoint.save:
        return False
    factor = checkpoint.checkpoint_factor
    extra = checkpoint.extra_save_iters or ()
    return bool((factor and iteration > 0 and iteration % factor == 0) or iteration in extra)


class Trainer:
    """The loop. `step` is a step function of megatron/engine/steps.py (`EngineStep` without pipeline,
    `PipelineStep` with); the default is the `EngineStep` for `model`."""

    def __init__(self, args, engine, model, parallel, iterators, logger, meter, progress: TrainProgress,
                 sum_sequence_parallel_grads_per_step: bool = False, step=None, preemption=None):
        self.args = args
        self.engine = engine
        self.model = model
        self.parallel = parallel
        self.train_iter, self.valid_iter, self.test_iter = iterators
        self.logger = logger
        self.meter = meter
        self.progress = progress
        self.device = engine.device
        self.grad_acc = args.derived.gradient_accumulation_steps
        self.global_batch = args.derived.train_batch_size
        # divergence policy (divergence.py): EngineStep in fp32 without ZeRO skips non-finite steps itself,
        # every step; the bf16 sync-free step counts its skips on the device (read at log steps); the other
        # wrappers count theirs on the host
        save = args.checkpoint.save
        self.guard = DivergenceGuard(args.training.max_consecutive_nonfinite_steps, save)
        self.guard.last_good_checkpoint = read_latest_or_none(save) if save else None
        self._skips_on_device = type(engine.optimizer).__name__ == "BF16_Optimizer"
        self.preemption = preemption  # preemption.Preemption or None: SIGTERM/SIGINT save and stop
        self.stopped_by: str | None = None
        self.step = step if step is not None else EngineStep(
            model, parallel, self.grad_acc, sum_sequence_parallel_grads=sum_sequence_parallel_grads_per_step,
            guard=self.guard, cudagraphs=args.training.torch_compile_mode in CUDAGRAPH_COMPILE_MODES)
        self._loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        self._loss_count = 0

    # ----------------------------------------------------------------------------------------------------
    def train_step(self, measure_grad_norm: bool = False) -> None:
        """One optimizer step over grad_acc micro-batches."""
        loss_sum, count = self.step.train(self.engine, self.train_iter, measure_grad_norm)
        self._loss_sum += loss_sum
        self._loss_count += count
        self.progress.iteration += 1
        self.progress.consumed_train_samples += self.global_batch

    # ----------------------------------------------------------------------------------------------------
    def _dp_mean(self, value: torch.Tensor) -> float:
        return data_parallel_mean(value, self.parallel)

    def _grad_norm(self):
        return self.step.grad_norm(self.engine)

    def _skipped_steps(self) -> int:
        """DeepSpeed's count (fp16 overflows, ZeRO, the bf16 device count) plus the fp32 steps skipped here."""
        return skipped_steps(self.engine) + self.guard.skipped_here

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
        count = 0
        for _ in range(self.args.training.eval_iters):
            loss_sum, micro_batches = self.step.eval(self.engine, iterator)
            total += loss_sum
            count += micro_batches
            if name == "valid":
                self.progress.consumed_valid_samples += self.grad_acc * \
                    self.args.derived.train_micro_batch_size_per_gpu * self.parallel.dp_size
        loss = self._dp_mean(total / count)
        self.logger.log_eval(self.progress.iteration, loss, math.exp(min(loss, 50.0)), name=name)
        self.engine.train()
        return loss

    def _should_save(self) -> bool:
        return save_due(self.args.checkpoint, self.progress.iteration)

    def save(self) -> str:
        if not all_finite(self.engine, self.model):  # never write a checkpoint from NaN/inf state
            raise DivergenceError(self.guard.refuse_save_message(self.progress.iteration))
        tag = save_checkpoint(self.engine, self.args, self.progress)
        self.guard.last_good_checkpoint = tag
        self.logger.info(f"saved checkpoint {self.args.checkpoint.save}/{tag}")
        return tag

    def _check_divergence(self, it: int, logged: bool, steps_in_interval: int) -> None:
        if not self._skips_on_device:
            self.guard.after_steps(it, self._skipped_steps(), 1)
        elif logged:
            self.guard.after_steps(it, self._skipped_steps(), steps_in_interval)

    def _stop_for_signal(self, it: int, last_saved) -> None:
        """Save (unless this step was just saved) and end the run after a SIGTERM/SIGINT."""
        self.stopped_by = self.preemption.signal_name()
        save = self.args.checkpoint.save
        if save and last_saved != it:
            self.save()
        where = (f"saved checkpoint {save}/global_step{it}; resume with `load: {save}`" if save else
                 "nothing was saved (no `save` directory is set)")
        self.logger.info(f"stopped by {self.stopped_by} after step {it} of {self.args.training.train_iters}; {where}")

    # ----------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run until train_iters; returns the last logged values (for tests and callers)."""
        training = self.args.training
        log_interval = self.args.logging.log_interval
        last_saved = None
        # weights, optimizer states and gradient buffers, before any activation exists
        self._static_memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        if self.progress.iteration == 0 and save_due(self.args.checkpoint, 0):  # extra_save_iters: [0, ...]
            self.save()
            last_saved = 0
        interval_start = time.perf_counter()
        steps_in_interval = 0
        while self.progress.iteration < training.train_iters:
            it = self.progress.iteration + 1
            self.train_step(measure_grad_norm=it % log_interval == 0 or it == training.train_iters)
            steps_in_interval += 1
            logged = it % log_interval == 0 or it == training.train_iters
            self._check_divergence(it, logged, steps_in_interval)
            if logged:
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
            if self.preemption is not None and self.preemption.should_stop():
                self._stop_for_signal(it, last_saved)
                self.logger.close()
                return {"valid_loss": None, "stopped_by": self.stopped_by}
        final = {"valid_loss": self.evaluate(self.valid_iter)}
        if self.args.checkpoint.save and last_saved != self.progress.iteration:
            self.save()
        self.logger.close()
        return final
