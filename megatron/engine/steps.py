"""Step functions: one optimizer step (and one evaluation batch) through the engine, whatever its kind.

The trainer's loop is the same for both engines; it calls a step function:

    train(engine, iterator, measure_grad_norm) -> (loss sum on the device, micro-batch count)
    eval(engine, iterator)                     -> (loss sum on the device, micro-batch count)
    grad_norm(engine)                          -> the last step's unclipped norm (float) or None

- `EngineStep` (pipe_parallel_size <= 1): grad_acc micro-batches of `engine(tokens, labels, loss_mask)`,
  `engine.backward`, `engine.step` (the optimizer steps at the accumulation boundary). Loss sum = the
  sum of this data-parallel rank's micro-batch losses. Under a CUDA-graph `torch_compile_mode` each
  micro-batch starts a new iteration of torch's CUDA-graph trees (`torch.compiler.cudagraph_mark_step_begin`),
  so that the recorded layers may reuse the graph memory of the last one, whose gradients the engine has
  folded into the optimizer's sums by then (and whose loss was read out as a new tensor).
- `PipelineStep` (pipe_parallel_size > 1): DeepSpeed's `PipelineEngine.train_batch` / `eval_batch` run the
  grad_acc micro-batches through the stages (1F1B schedule), reduce tied and data-parallel gradients,
  clip and step. The loss exists on the last stage only; DeepSpeed broadcasts it over the pipeline group
  (`dp_group_loss`: this data-parallel rank's mean over the micro-batches), so every rank reports the
  same number, counted once per step. Loss sum = that mean, count 1.

Both return device scalars: nothing here waits for the device. The grad norm of plain fp32 training
(which DeepSpeed does not keep) is measured here with `megatron.mpu.reductions.grad_norm` on the steps
that log (tensor and pipeline stages summed, the tied copy counted once), and on every step when
`EngineStep` has a divergence guard (the trainer's: a non-finite norm skips the optimizer step, one host
read of the norm per step, fp32 without ZeRO only); the wrappers of bf16/fp16/ZeRO record it themselves.
`PipelineStep` in fp32 does not skip non-finite steps (DeepSpeed's pipeline engine steps inside
`train_batch`); the trainer's finiteness check before every save still refuses to write NaN state.
"""

from __future__ import annotations

import torch

from megatron.engine.build import FP32_GRAD_NORM, engine_reports_grad_norm, reported_grad_norm
from megatron.mpu.grads import allreduce_sequence_parallel_grads
from megatron.mpu.reductions import grad_norm


class EngineStep:
    def __init__(self, model: torch.nn.Module, parallel, grad_acc: int, sum_sequence_parallel_grads: bool = False,
                 guard=None, cudagraphs: bool = False):
        self.model = model  # the GPTModel inside the engine (its parameters: SP grad sums, grad norm)
        self.cudagraphs = cudagraphs  # layers compiled in a CUDA-graph mode: mark each micro-batch
        # megatron.training.divergence.DivergenceGuard or None: in plain fp32 (DeepSpeed keeps no norm and
        # would step on NaN gradients) the norm is then measured at every step and a non-finite one skips it
        self.guard = guard
        self.parallel = parallel
        self.grad_acc = grad_acc
        # Under SP, in fp32 at ZeRO stage 0, the norm/bias grads are summed over the tensor group once per
        # step here; otherwise tensor hooks registered at build time do it (see megatron/mpu/grads.py).
        self.sum_sequence_parallel_grads = sum_sequence_parallel_grads
        self._fp32_grad_norm = None

    def _forward_loss(self, engine, batch: dict) -> torch.Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        # tensors to the device; host values (max_seqlen of document-aware batches) stay on the host
        batch = {key: value.to(engine.device, non_blocking=True) if torch.is_tensor(value) else value
                 for key, value in batch.items()}
        # document-aware batches (data.reset_attention_mask / reset_position_ids) carry more fields
        documents = {key: batch[key] for key in ("position_ids", "cu_seqlens", "max_seqlen") if key in batch}
        # the model returns the scalar loss itself (fused output projection + cross entropy by default),
        # so the [b, s, vocab/tp] logits never leave it
        return engine(batch["tokens"], batch["labels"], batch["loss_mask"], **documents)

    def train(self, engine, iterator, measure_grad_norm: bool = False):
        engine.train()
        loss_sum = torch.zeros((), device=engine.device, dtype=torch.float32)
        for micro in range(self.grad_acc):
            loss = self._forward_loss(engine, next(iterator))
            engine.backward(loss)
            last = micro == self.grad_acc - 1
            if last and self.sum_sequence_parallel_grads:
                allreduce_sequence_parallel_grads(self.model, self.parallel)
            skip = False
            if last and (measure_grad_norm or self.guard is not None) and not engine_reports_grad_norm(engine):
                self._fp32_grad_norm = grad_norm(self.model.parameters(), self.parallel)
                skip = self.guard is not None and self.guard.is_nonfinite(self._fp32_grad_norm)
            if skip:
                with self.guard.skipping(engine.optimizer, True):
                    engine.step()  # clips, zeroes the gradients and advances the schedule; no update
            else:
                engine.step()  # steps the optimizer only at the accumulation boundary
            loss_sum += loss.detach().float()
        return loss_sum, self.grad_acc

    @torch.no_grad()
    def eval(self, engine, iterator):
        total = torch.zeros((), device=engine.device, dtype=torch.float32)
        for _ in range(self.grad_acc):
            total += self._forward_loss(engine, next(iterator)).float()
        return total, self.grad_acc

    def grad_norm(self, engine):
        norm = reported_grad_norm(engine) if engine_reports_grad_norm(engine) else self._fp32_grad_norm
        return None if norm is None else float(norm)


def pipeline_batches(iterator):
    """Our micro-batch dicts as the pipeline engine reads them: ((tokens,), (labels, loss_mask)); the first
    stage takes the inputs, the last the labels."""
    for batch in iterator:
        yield batch["tokens"], (batch["labels"], batch["loss_mask"])


class PipelineStep:
    def __init__(self, module, parallel):
        self.module = module  # this rank's PipelineModule
        self.parallel = parallel
        self._fp32_grad_norm = None
        self._measure = False
        self._wrapped = None
        self._adapters = {}

    def _batches(self, iterator):
        """One adapter per source iterator, kept so that no micro-batch is read ahead and lost."""
        key = id(iterator)
        if key not in self._adapters:
            self._adapters[key] = (iterator, pipeline_batches(iterator))
        return self._adapters[key][1]

    def _measure_fp32_norm_before_step(self, engine) -> None:
        """In plain fp32 DeepSpeed keeps no norm. With clipping, `build.clip_fp32_pipeline_by_global_norm`
        records it; without, wrap the engine's model step so that, on the steps that log, the norm is taken
        after the gradient reductions."""
        if self._wrapped is engine or engine_reports_grad_norm(engine) or engine.gradient_clipping() > 0.0:
            return
        original = engine._take_model_step

        def take_model_step(*args, **kwargs):
            if self._measure:
                self._fp32_grad_norm = grad_norm(self.module.parameters(), self.parallel)
            return original(*args, **kwargs)

        engine._take_model_step = take_model_step
        self._wrapped = engine

    def train(self, engine, iterator, measure_grad_norm: bool = False):
        self._measure_fp32_norm_before_step(engine)
        self._measure = measure_grad_norm
        engine.train_batch(self._batches(iterator))
        return engine.dp_group_loss.detach().float().reshape(()), 1

    @torch.no_grad()
    def eval(self, engine, iterator):
        loss = engine.eval_batch(self._batches(iterator))  # mean over micro-batches and data parallel
        engine.train()
        return loss.detach().float().reshape(()), 1  # the engine returns shape [1]; the trainer sums scalars

    def grad_norm(self, engine):
        if engine_reports_grad_norm(engine):
            norm = reported_grad_norm(engine)
        elif engine.gradient_clipping() > 0.0:
            norm = getattr(engine, FP32_GRAD_NORM, None)
        else:
            norm = self._fp32_grad_norm
        return None if norm is None else float(norm)
