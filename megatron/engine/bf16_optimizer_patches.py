"""Four hot paths of DeepSpeed's BF16_Optimizer without per-parameter launches, redundant fills or a host
wait; on request, its fp32 gradient sums freed between steps, its AdamW fused with the bf16 copy, and (one
micro-batch a step, one data-parallel rank) that AdamW reading the bf16 gradients without the sums.

With bf16 weights and `data_types.grad_accum_dtype: fp32` (the shipped bf16 configs) DeepSpeed 0.19 runs
BF16_Optimizer (fp32 master weights, fp32 gradient sums). `install()` replaces four of its methods; all
keep DeepSpeed's data layout (flat fp32 buffers, the `_hp_grad` links, the checkpoint format). (The other
per-step wait, DeepSpeed's throughput timer, is switched off in `NeoXArgs.deepspeed_config()`.)

0. `backward_prologue` runs before every micro-batch's backward. DeepSpeed's version zeroes the bf16
   parameter gradients left from the previous micro-batch (already added into the fp32 sums), so that
   autograd then adds each new gradient into a zero tensor: a memset plus one add kernel per parameter.
   Ours has nothing to clear: `update_hp_grads` below drops each bf16 gradient (`lp.grad = None`) right
   after adding it into the fp32 sums, and autograd then stores the next one as is. Same values
   (0 + g = g), ~290 fewer launches per micro-batch on the 410M model, the bf16 gradients freed one
   backward earlier. It also matters under the pipeline engine: DeepSpeed runs the prologue from a hook on
   the stage's output, i.e. in the middle of the last stage's backward, after the loss function (outside
   the module: our output head, megatron/model/pipeline.py) has already put the head weight's gradient
   into `.grad`; DeepSpeed's prologue would zero it there (tests/distributed/test_pipeline.py, bf16).

1. `update_hp_grads` runs after every micro-batch's backward. DeepSpeed's version, for each parameter in
   turn, casts its bf16 gradient to a new fp32 tensor and adds that into the parameter's slice of the fp32
   gradient buffer:

       for each parameter p:   hp_grad[p] += p.grad.to(float32)          (2 kernels + 1 allocation each)

   On the 410M model (292 parameter tensors) that is ~600 kernel launches and 11.9 ms of host time per
   micro-batch on an H100 machine (cProfile in `tools/bench --profile`). Ours is one multi-tensor kernel
   per parameter group: a casting copy for the first micro-batch after the buffer was cleared (the sum
   is zero then, and 0 + g = g), an add for the later ones:

       torch._foreach_copy_(hp_grads, lp_grads)   or   multi_tensor_add.add_(hp_grads, lp_grads)

   the same values bit for bit (bf16 -> fp32 is exact) without the temporary fp32 copies. (torch's
   `_foreach_add_` runs a mixed-dtype add one tensor at a time, at ~1 TB/s on an H100, so the add is our
   one-launch Triton kernel on CUDA, `multi_tensor_add`; the copy is torch's multi-tensor kernel.)
   A parameter without a gradient in that first micro-batch has its sum zeroed instead, so each sum is
   written before it is read, whatever it held.

2. `clear_hp_grads` runs after every optimizer step, twice (inside `step` and in the engine's `zero_grad`).
   DeepSpeed's version zero-fills the whole fp32 gradient buffer (1.6 GB on the 410M model: ~0.5 ms of
   memory bandwidth on an H100, each time). Item 1 overwrites every sum at the next step's first
   micro-batch, so ours only marks the sums as stale (`_hp_grads_stale`); the buffer is filled as before
   where DeepSpeed's accumulation runs instead of ours (`immediate_grad_update`, expert-parallel folding),
   and by `step` when it comes with no backward since the last one (the sums are zero then).

3. `step` runs once per optimizer step. DeepSpeed's version computes the global gradient norm one
   parameter at a time (~900 launches), then reads it on the host (`is_invalid_grad_norm`) to decide
   whether to skip the step, and again to decide whether to clip. That read waits for the whole backward
   pass; the GPU then idles while the host issues the rest of the step and the next forward (13.7 ms of a
   105 ms 410M step, docs/PERFORMANCE.md). Ours never waits:

       n      = sqrt(sum_p ||g_p||^2)          foreach norms; squares summed over the model-parallel group
       bad    = 1.0 if n is inf or nan else 0.0                                   (a device scalar)
       scale  = max(1, (n + 1e-6) / clip_grad)  (clip_grad > 0)                   (a device scalar)
       AdamW(g / scale), skipped entirely where bad == 1           (torch fused AdamW's grad_scale/found_inf)

   which is DeepSpeed's update (g * clip_grad / (n + 1e-6) when that factor is < 1; no update and no
   Adam step count on a non-finite norm) up to the rounding of one division. Differences, by design:
   the grad norm is a device scalar (the trainer reads it at log time, as `float(norm)`: inf or nan on
   a skipped step, where DeepSpeed reports inf), skipped steps are counted on the device
   (`nonfinite_steps`) instead of in `engine.skipped_steps`, and the LR schedule advances on a skipped
   step (as in Megatron and torchtitan, which in bf16 do not skip at all).
   It needs a torch Adam/AdamW with `fused=True` (the only torch optimizer that takes `found_inf`; our
   optimizer is fused on GPU) and no MoE or Muon groups; otherwise DeepSpeed's step runs unchanged.

4. With `free_grad_sums_between_steps` (set by `enable_free_grad_sums`, the config key of that name) the
   fp32 gradient buffer's memory is handed back to the allocator after each step (its storage resized to
   0 bytes; every view of it stays a valid object) and taken again when `update_hp_grads` first writes
   it, after the next backward. Item 1 writes every sum before anything reads it, so the uninitialized
   memory is never seen. The sums (4 bytes a parameter) then exist only from the end of the step's first
   backward to its optimizer step: not beside the activations of a forward at one micro-batch per step,
   where the peak usually is. Same values bit for bit. Nothing may read the sums between steps then (their
   views point at a 0-byte storage): nothing in this trainer does; the checkpoint holds masters and Adam
   states, not gradients.

5. With `fused_optimizer_step` (set by `enable_fused_step`) the AdamW update of item 3 and
   `update_lp_params`'s copy of the fp32 masters into this rank's bf16 weights are one Triton kernel per
   parameter group (megatron/engine/fused_adamw.py: the same formula as torch's fused AdamW, in fp32; the
   masters are read once instead of twice), and the other ranks' partitions are gathered as DeepSpeed
   does. Same optimizer state (torch's AdamW `state_dict`), so checkpoints do not depend on it. Not bit for
   bit torch's kernel: its powers and divisions round alike up to a few fp32 ulps of the update.

6. With `enable_lp_grad_step` (one micro-batch per step, one data-parallel rank, item 5 on) the bf16 gradients
   are never folded into the fp32 sums: `update_hp_grads` leaves each in `lp.grad`, `step` takes the norm
   over them (foreach norms in fp32, the same values: bf16 -> fp32 is exact) and item 5's kernel reads each
   one where autograd put it (`fused_adamw.step_gathered_`). The fold's copy (6 bytes a parameter) and half
   of the norm's and the kernel's gradient reads go, and with item 4 the fp32 sums are never allocated.
   Should a second backward come before the step after all (more micro-batches than configured), the
   waiting bf16 gradients are folded into the sums first (`backward_prologue`), so autograd never adds
   two micro-batches in bf16.

Optimizers that accumulate in backward hooks (`immediate_grad_update`) or correct expert-parallel gradients
first (`autoep_folding_tp_group`) keep DeepSpeed's `update_hp_grads` and `clear_hp_grads` (and item 4
does nothing for them: their hooks write into the buffer during backward).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.engine import fused_adamw, multi_tensor_add

_ORIGINAL: dict[str, Callable] = {}
_NEEDED_ATTRIBUTES = ("bf16_groups", "fp32_groups_gradients", "fp32_groups_gradients_flat", "fp32_groups_has_gradients",
                      "immediate_grad_update")
_STEP_ATTRIBUTES = ("get_grads_for_norm", "clip_grad", "fp32_groups_flat_partition",
                    "fp32_groups_gradient_flat_partition", "grad_acc_dtype", "update_lp_params", "clear_hp_grads",
                    "_lazy_init_hp_params_optimizer_state")
_FUSED_ATTRIBUTES = ("bf16_partitioned_groups", "real_dp_process_group", "bf16_groups_flat",
                     "nccl_start_alignment_factor", "allgather_bucket_size")
_CLIP_EPS = 1e-6  # DeepSpeed's clip_tensors_by_global_norm: coefficient clip_grad / (norm + eps)


def backward_prologue(self) -> None:
    """BF16_Optimizer.backward_prologue with nothing to clear (item 0 of the module docstring): our
    `update_hp_grads` dropped every bf16 gradient after adding it into the fp32 sums (or, item 6, left them
    for the step: folded now if another backward comes first)."""
    if not _accumulates_here(self):  # DeepSpeed's accumulation (e.g. immediate_grad_update): its prologue
        return _ORIGINAL["backward_prologue"](self)
    if getattr(self, "_lp_grads_pending", False):
        self._lp_grads_pending = False
        _fold_lp_grads(self)


def _accumulates_here(self) -> bool:
    """Whether `update_hp_grads` below (not DeepSpeed's) fills this optimizer's fp32 gradient sums."""
    return (not self.immediate_grad_update and getattr(self, "autoep_folding_tp_group", None) is None
            and all(hasattr(self, name) for name in _NEEDED_ATTRIBUTES))


def enable_free_grad_sums(optimizer) -> bool:
    """Turn on item 4 of the module docstring for this BF16_Optimizer; returns False (nothing changed)
    where its sums are not filled by `update_hp_grads` below."""
    if not _accumulates_here(optimizer):
        return False
    optimizer._free_hp_grads_between_steps = True
    return True


def _release_hp_grads(self) -> None:
    """After a step: the fp32 gradient buffers' memory back to the allocator (item 4)."""
    if getattr(self, "_free_hp_grads_between_steps", False):
        for flat in self.fp32_groups_gradients_flat:
            flat.untyped_storage().resize_(0)


def _restore_hp_grads(self) -> None:
    """Before the sums are written again: each released buffer gets its memory back (uninitialized)."""
    for flat in self.fp32_groups_gradients_flat:
        storage = flat.untyped_storage()
        needed = (flat.storage_offset() + flat.numel()) * flat.element_size()
        if storage.nbytes() < needed:
            storage.resize_(needed)


def hp_grads_allocated(optimizer) -> bool:
    """Whether every fp32 gradient buffer holds its memory now (tests, memory reports)."""
    return all(flat.untyped_storage().nbytes() > 0 for flat in optimizer.fp32_groups_gradients_flat)


@torch.no_grad()
def update_hp_grads(self, clear_lp_grads: bool = False) -> None:
    """BF16_Optimizer.update_hp_grads with one multi-tensor copy or add per group (module docstring); with
    item 6, the first micro-batch's bf16 gradients left where they are for the step."""
    if not _accumulates_here(self):  # DeepSpeed's (which returns at once under immediate_grad_update)
        return _ORIGINAL["update_hp_grads"](self, clear_lp_grads=clear_lp_grads)
    if (getattr(self, "_lp_grad_layouts", None) is not None and getattr(self, "_hp_grads_stale", True)
            and not getattr(self, "_lp_grads_pending", False)):
        self._lp_grads_pending = True  # the sums stay stale and unallocated; the step reads lp.grad
        return
    _fold_lp_grads(self)


@torch.no_grad()
def _fold_lp_grads(self) -> None:
    """Add every bf16 gradient into its fp32 sum (a copy into a stale sum) and drop it (items 1 and 2)."""
    stale = getattr(self, "_hp_grads_stale", True)  # first micro-batch since clear_hp_grads
    if stale:  # every sum below is copied or zeroed before it is read
        _restore_hp_grads(self)
    for group_index, group in enumerate(self.bf16_groups):
        has_gradient = self.fp32_groups_has_gradients[group_index]
        first_hp, first_lp, sum_hp, sum_lp, no_gradient = [], [], [], [], []
        for param_index, lp in enumerate(group):
            hp_grad = self.fp32_groups_gradients[group_index][param_index]
            if lp.grad is None:
                if stale:  # holds an earlier step's sum: this step's is zero so far (still "no gradient":
                    no_gradient.append(hp_grad)  # the norm leaves it out, as DeepSpeed's does)
                continue
            hp_list, lp_list = (sum_hp, sum_lp) if has_gradient[param_index] else (first_hp, first_lp)
            hp_list.append(hp_grad)
            lp_list.append(lp.grad.view(hp_grad.shape))
            lp._hp_grad = hp_grad
            has_gradient[param_index] = True
        if first_hp:  # first gradient since the buffer was cleared: 0 + g is g, a casting copy suffices
            torch._foreach_copy_(first_hp, first_lp)
        if sum_hp:
            multi_tensor_add.add_(sum_hp, sum_lp)  # fp32 += bf16, upcast inside the kernel
        if no_gradient:
            torch._foreach_zero_(no_gradient)
        for lp in group:  # added into the sums: the next micro-batch's backward stores its own (item 0);
            lp.grad = None  # this also serves `clear_lp_grads=True`
    self._hp_grads_stale = False


def clear_hp_grads(self) -> None:
    """BF16_Optimizer.clear_hp_grads without the fill where `update_hp_grads` above overwrites every sum at
    the next step's first micro-batch (item 2 of the module docstring)."""
    if not _accumulates_here(self):
        return _ORIGINAL["clear_hp_grads"](self)
    for index, group in enumerate(self.fp32_groups_gradients):
        self.fp32_groups_has_gradients[index] = [False] * len(group)
    self._hp_grads_stale = True
    _release_hp_grads(self)


def supports_sync_free_step(optimizer) -> bool:
    """Whether `step` below can run for this BF16_Optimizer: a fused torch Adam/AdamW inside (its kernel
    skips the update on `found_inf`), no MoE or Muon parameter groups, and the attributes it uses."""
    inner = getattr(optimizer, "optimizer", None)
    return (isinstance(inner, torch.optim.Adam) and all(group.get("fused") for group in inner.param_groups)
            and not getattr(optimizer, "has_moe_layers", False) and not getattr(optimizer, "_uses_muon", False)
            and all(hasattr(optimizer, name) for name in _STEP_ATTRIBUTES))


def global_grad_norm(grads: list[torch.Tensor], mpu, device: torch.device) -> torch.Tensor:
    """L2 norm over `grads` (this rank's share: DeepSpeed's `get_grads_for_norm` leaves out replicated
    parameters on tensor ranks > 0) and over the model-parallel group; a device fp32 scalar, never read."""
    if grads:
        per_tensor = torch._foreach_norm(grads, 2, dtype=torch.float32)
        squares = torch.stack(per_tensor).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=device)
    if mpu is not None:
        import deepspeed.comm as dist

        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    return squares.sqrt()


@torch.no_grad()
def step(self, closure=None) -> None:
    """BF16_Optimizer.step without a host read (the math is in the module docstring)."""
    if closure is not None:
        raise NotImplementedError(f"{type(self).__name__} does not support closure.")
    if getattr(self, "_lp_grads_pending", False):  # item 6: AdamW reads the bf16 gradients themselves
        if _lp_grads_readable(self):
            return _step_on_lp_grads(self)
        self._lp_grads_pending = False  # a gradient the kernel cannot read: the sums as usual
        _fold_lp_grads(self)
    if getattr(self, "_hp_grads_stale", False):  # no backward since the last step: every sum is zero
        _restore_hp_grads(self)
        for flat_gradients in self.fp32_groups_gradients_flat:
            flat_gradients.zero_()
        self._hp_grads_stale = False
    if not supports_sync_free_step(self):
        return _ORIGINAL["step"](self)
    self.overflow = False  # never known on the host: a non-finite step is skipped on the device instead
    grads_for_norm, _ = self.get_grads_for_norm()
    device = self.fp32_groups_flat_partition[0].device
    found_inf, grad_scale = _norm_and_skip(self, grads_for_norm, device)

    for param_partition, grad_partition in zip(self.fp32_groups_flat_partition,
                                               self.fp32_groups_gradient_flat_partition):
        param_partition.grad = (grad_partition.to(param_partition.dtype)
                                if grad_partition.dtype != param_partition.dtype else grad_partition)
    inner = self.optimizer
    lp_targets = _fused_step_targets(self)
    if lp_targets is not None:  # item 5: AdamW and the bf16 weights of this rank's partition in one kernel
        fused_adamw.step_(inner, lp_targets, found_inf, grad_scale)
    else:
        inner.found_inf, inner.grad_scale = found_inf, grad_scale  # torch's Adam.step hands both to the kernel
        try:
            inner.step()
        finally:
            del inner.found_inf, inner.grad_scale
    if self.grad_acc_dtype is not torch.float32 or getattr(self, "_free_hp_grads_between_steps", False):
        for param_partition in self.fp32_groups_flat_partition:  # a temporary, or a view about to be freed
            param_partition.grad = None
    self._lazy_init_hp_params_optimizer_state()  # links the optimizer state to the params after step 1
    if lp_targets is not None:  # this rank's bf16 partition is written: the other ranks' are gathered
        _gather_lp_params(self)
    else:
        self.update_lp_params()  # bf16 weights <- fp32 masters (unchanged on a skipped step)
    self.clear_hp_grads()


def _norm_and_skip(self, grads_for_norm: list[torch.Tensor], device: torch.device):
    """The step's device scalars from the gradients the norm counts: found_inf (1.0 skips the update) and the
    clipping divisor (None without clipping); the norm kept for the trainer, the skip counted (item 3)."""
    norm = global_grad_norm(grads_for_norm, self.mpu, device)
    found_inf = (~torch.isfinite(norm)).float()  # 1.0: the fused kernel leaves params and moments alone
    if getattr(self, "_nonfinite_steps", None) is None:
        self._nonfinite_steps = torch.zeros((), dtype=torch.float32, device=device)
    self._nonfinite_steps += found_inf
    self._global_grad_norm = norm
    grad_scale = None
    if self.clip_grad > 0.0:
        grad_scale = torch.clamp((norm + _CLIP_EPS) / self.clip_grad, min=1.0)  # divides the gradients
    return found_inf, grad_scale


def _lp_grads_for_norm(self) -> list[torch.Tensor]:
    """The bf16 gradients DeepSpeed's `get_grads_for_norm` would count as fp32 sums: those that exist, without
    pipeline-replicated parameters, and on tensor ranks > 0 only the tensor-parallel ones."""
    from deepspeed.runtime.utils import bwc_tensor_model_parallel_rank, is_model_parallel_parameter

    tensor_rank = bwc_tensor_model_parallel_rank(mpu=self.mpu)
    return [lp.grad for group in self.bf16_groups for lp in group
            if lp.grad is not None and not getattr(lp, "ds_pipe_replicated", False)
            and (tensor_rank == 0 or is_model_parallel_parameter(lp))]


def _lp_grads_readable(self) -> bool:
    """Whether every bf16 gradient is contiguous and of its parameter's dtype (what the kernel reads)."""
    return all(lp.grad is None or (lp.grad.is_contiguous() and lp.grad.dtype == lp.dtype)
               for group in self.bf16_groups for lp in group)


@torch.no_grad()
def _step_on_lp_grads(self) -> None:
    """`step` of item 6: norm, skip and clipping as in item 3, AdamW reading each bf16 gradient in place
    and writing the bf16 weights (item 5), then the gradients dropped."""
    self._lp_grads_pending = False
    self.overflow = False
    device = self.fp32_groups_flat_partition[0].device
    found_inf, grad_scale = _norm_and_skip(self, _lp_grads_for_norm(self), device)
    grads = [[lp.grad for lp in group] for group in self.bf16_groups]
    fused_adamw.step_gathered_(self.optimizer, _lp_partitions(self), grads, self._lp_grad_layouts, found_inf,
                               grad_scale)
    for group in self.bf16_groups:
        for lp in group:
            lp.grad = None
    self._lazy_init_hp_params_optimizer_state()
    _gather_lp_params(self)
    self.clear_hp_grads()


def enable_lp_grad_step(optimizer) -> bool:
    """Turn on item 6 of the module docstring for this BF16_Optimizer (call it only where every step has one
    micro-batch); returns False (nothing changed) where it cannot run: item 5 off, more than one
    data-parallel rank (the fp32 sums are what DeepSpeed reduces), MoE groups, or gradients that are not
    views of one flat buffer per group."""
    import deepspeed.comm as dist

    if (not getattr(optimizer, "_fused_step", False) or getattr(optimizer, "has_moe_layers", False)
            or not _accumulates_here(optimizer)):
        return False
    if any(dist.get_world_size(group=group) != 1 for group in optimizer.real_dp_process_group):
        return False
    layouts = []
    for group_index, group in enumerate(optimizer.bf16_groups):
        flat = optimizer.bf16_groups_flat[group_index]
        if not all(lp.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for lp in group):
            return False
        offsets = [lp.storage_offset() - flat.storage_offset() for lp in group]
        layouts.append(fused_adamw.GradLayout(offsets, [lp.numel() for lp in group], flat.device))
    if not fused_adamw.gathered_applies(optimizer.optimizer, _lp_partitions(optimizer), layouts):
        return False
    optimizer._lp_grad_layouts = layouts
    return True


def _lp_partitions(self) -> list[list[torch.Tensor]]:
    """For each parameter group, [this rank's partition of the flat bf16 weights]: where its fp32 master
    partition (the inner optimizer's one parameter of that group) is copied to by `update_lp_params`."""
    import deepspeed.comm as dist

    return [[partitions[dist.get_rank(group=self.real_dp_process_group[index])]]
            for index, partitions in enumerate(self.bf16_partitioned_groups)]


def enable_fused_step(optimizer) -> bool:
    """Turn on item 5 of the module docstring for this BF16_Optimizer; returns False (nothing changed) where
    it cannot run: not our sync-free step, or `fused_adamw.applies` says no (CPU, no Triton, another optimizer)."""
    if not (supports_sync_free_step(optimizer) and all(hasattr(optimizer, name) for name in _FUSED_ATTRIBUTES)):
        return False
    if not fused_adamw.applies(optimizer.optimizer, _lp_partitions(optimizer)):
        return False
    optimizer._fused_step = True
    return True


def _fused_step_targets(self) -> Optional[list[list[torch.Tensor]]]:
    """The bf16 partitions for `fused_adamw.step_` when item 5 is on and applies to this step (the gradients
    are checked each step: a temporary fp32 copy of bf16 sums, say, is fine; anything else takes torch's)."""
    if not getattr(self, "_fused_step", False):
        return None
    targets = _lp_partitions(self)
    return targets if fused_adamw.applies(self.optimizer, targets) else None


def _gather_lp_params(self) -> None:
    """`update_lp_params` without its copy (the fused kernel wrote this rank's partition): every rank's
    partition gathered into the full bf16 weights, as DeepSpeed does it (nothing to gather at dp == 1)."""
    from deepspeed.runtime.utils import all_gather_dp_groups

    all_gather_dp_groups(groups_flat=self.bf16_groups_flat, partitioned_param_groups=self.bf16_partitioned_groups,
                         dp_process_group=self.real_dp_process_group,
                         start_alignment_factor=self.nccl_start_alignment_factor,
                         allgather_bucket_size=self.allgather_bucket_size)


def nonfinite_steps(optimizer) -> int:
    """Optimizer steps this process skipped because the gradient norm was inf or nan (reads the device;
    the count is not saved in checkpoints)."""
    counter = getattr(optimizer, "_nonfinite_steps", None)
    return 0 if counter is None else int(counter.item())


_PATCHES = {"backward_prologue": backward_prologue, "update_hp_grads": update_hp_grads,
            "clear_hp_grads": clear_hp_grads, "step": step}


def install() -> bool:
    """Use `backward_prologue`, `update_hp_grads`, `clear_hp_grads` and `step` above in DeepSpeed's BF16_Optimizer
    (idempotent). Returns False, changing nothing, when this DeepSpeed lacks one of them."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not all(callable(getattr(BF16_Optimizer, name, None)) for name in _PATCHES):
        return False
    for name, patch in _PATCHES.items():
        current = getattr(BF16_Optimizer, name)
        if current is not patch:
            _ORIGINAL[name] = current
            setattr(BF16_Optimizer, name, patch)
    return True


def uninstall() -> None:
    """Put DeepSpeed's methods back (tests compare both)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    for name in _PATCHES:
        if name in _ORIGINAL:
            setattr(BF16_Optimizer, name, _ORIGINAL.pop(name))
