"""AdamW over BF16_Optimizer's flat fp32 masters with the bf16 weights written in the same pass.

BF16_Optimizer's step runs torch's fused AdamW over each parameter group's flat fp32 master partition, then
copies the partition into the bf16 weights (`update_lp_params`): the update reads and writes the masters and
both moments, and the copy reads the masters once more. Here one Triton kernel per group does both, element
by element (fp32 arithmetic, torch's fused AdamW formula, decoupled weight decay):

    skip everything                              if found_inf == 1 (a non-finite gradient norm)
    g      = grad / grad_scale                   (grad_scale: the clipping divisor, when clipping)
    p      = p - lr * wd * p
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g * g
    p      = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    lp     = p rounded to the weights' dtype                     (the bf16 weights, this rank's partition)

with t the group's step count, kept on the device as torch keeps it (`state["step"]`, fp32 scalar; it
advances by 1 - found_inf before the kernel, as torch's fused step advances it and takes it back on
found_inf). Traffic per parameter: read grad, p, m, v (16 bytes), write p, m, v, lp (14): 30 bytes
against 28 + 6 for torch's kernel and DeepSpeed's copy. The optimizer state is torch's AdamW's
(`exp_avg`, `exp_avg_sq`, `step`, created as torch creates them), so checkpoints are the same and a run may
resume with or without this kernel (`fused_optimizer_step`).

`step_gathered_()` is the same update for a group whose gradients were never folded into one flat fp32
buffer: each parameter's own bf16 gradient (autograd's tensor) is read where it lies, through a table of
their addresses (`GradLayout`: which tensor and which slice of it each program reads, built once; the
addresses, new every step, are one small copy). bf16 -> fp32 is exact, so the update is the flat kernel's
with the fold's copy of the gradients (2 bytes written and 4 read a parameter) and its launch gone, and
2 bytes a parameter less read here (28 bytes of traffic a parameter). Elements of the flat partition that no
parameter covers (DeepSpeed's alignment padding, zero) are left alone, which is what AdamW would do to
them (zero weights, moments and gradients stay zero); a parameter without a gradient this step is updated
with a zero gradient, as BF16_Optimizer's zeroed sum for it would be.

`applies()` says where it runs: a CUDA torch AdamW (or Adam with decoupled decay) without amsgrad, maximize
or capturable, number (not tensor) hyperparameters, every parameter an fp32 contiguous tensor with a same-sized bf16/fp16
target. Elsewhere the caller keeps torch's step and DeepSpeed's copy (CPU, no Triton).
"""

from __future__ import annotations

from typing import Optional

import torch

BLOCK = 1024  # elements per program (bench_optimizer on an H200: 1024 x 4 warps the fastest of five configs)
ALIGN = 16  # elements: where GradLayout's offsets and sizes are multiples of it (and each gradient's address of
# 16 bytes), the gathered kernel is told so (tl.multiple_of), which lets Triton vectorize its loads and stores
NUM_WARPS = 4
_LP_DTYPES = (torch.bfloat16, torch.float16)


def applies(optimizer: torch.optim.Optimizer, lp_targets: list[list[torch.Tensor]]) -> bool:
    """Whether `step_` can update `optimizer` (a torch Adam/AdamW), writing each parameter of group i into
    `lp_targets[i]` (same order and sizes)."""
    if not isinstance(optimizer, torch.optim.Adam) or _kernel() is None:
        return False
    if len(lp_targets) != len(optimizer.param_groups):
        return False
    for group, targets in zip(optimizer.param_groups, lp_targets):
        decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        if (not decoupled or group.get("amsgrad") or group.get("maximize") or group.get("capturable")
                or not all(_is_number(group[k]) for k in ("lr", "eps", "weight_decay"))
                or not all(_is_number(b) for b in group["betas"])
                or len(targets) != len(group["params"])):
            return False
        for param, target in zip(group["params"], targets):
            if not (param.is_cuda and param.dtype == torch.float32 and param.is_contiguous()
                    and target.device == param.device and target.dtype in _LP_DTYPES and target.is_contiguous()
                    and target.numel() == param.numel()
                    and (param.grad is None or (param.grad.dtype == torch.float32 and param.grad.is_contiguous()))
                    and _state_fits(optimizer.state.get(param), param)):
                return False
    return True


def _is_number(value) -> bool:
    """A Python int or float hyperparameter (a tensor lr, say, would need a host read per step)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _state_fits(state: Optional[dict], param: torch.Tensor) -> bool:
    """No state yet (created at the first step), or torch's fused AdamW state on the parameter's device."""
    if not state:
        return True
    step = state.get("step")
    moments = [state.get("exp_avg"), state.get("exp_avg_sq")]
    return (isinstance(step, torch.Tensor) and step.device == param.device and step.dtype == torch.float32
            and step.numel() == 1
            and all(isinstance(m, torch.Tensor) and m.device == param.device and m.dtype == torch.float32
                    and m.is_contiguous() and m.numel() == param.numel() for m in moments))


def _state(optimizer: torch.optim.Adam, param: torch.Tensor) -> dict:
    """The parameter's AdamW state, created as torch's fused AdamW creates it on its first step."""
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def step_(optimizer: torch.optim.Adam, lp_targets: list[list[torch.Tensor]], found_inf: torch.Tensor,
          grad_scale: Optional[torch.Tensor] = None) -> None:
    """One AdamW step of every parameter with a gradient, its weights-dtype copy written into the matching
    `lp_targets` tensor (module docstring). `found_inf`: fp32 device scalar, 1.0 skips the step (params,
    moments, step count and targets untouched); `grad_scale`: fp32 device scalar dividing the gradients."""
    kernel, triton_dtypes = _kernel()
    found_inf = found_inf.to(torch.float32).reshape(())
    scale = grad_scale if grad_scale is not None else found_inf  # any fp32 scalar: not read without HAS_SCALE
    for group, targets in zip(optimizer.param_groups, lp_targets):
        beta1, beta2 = group["betas"]
        for param, target in zip(group["params"], targets):
            if param.grad is None or param.numel() == 0:
                continue
            state = _state(optimizer, param)
            state["step"] += 1.0 - found_inf  # torch: += 1, then -= found_inf
            numel = param.numel()
            kernel[((numel + BLOCK - 1) // BLOCK,)](
                param, param.grad, state["exp_avg"], state["exp_avg_sq"], target, numel,
                state["step"], found_inf, scale,  # float(): an int would make Triton compile an integer argument
                float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                HAS_SCALE=grad_scale is not None, LP_DTYPE=triton_dtypes[target.dtype], BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )


class GradLayout:
    """Where the gradients of a group's parameters go in its flat partition, cut into BLOCK-element programs:
    program i reads elements [block_start[i], +BLOCK) of parameter block_tensor[i], whose element 0 is
    element tensor_offset[block_tensor[i]] of the flat partition (device tensors, built once)."""

    def __init__(self, offsets: list[int], numels: list[int], device: torch.device):
        if len(offsets) != len(numels):
            raise ValueError(f"{len(offsets)} offsets for {len(numels)} parameters")
        numel = torch.tensor(numels, dtype=torch.int64)
        blocks = (numel + BLOCK - 1) // BLOCK  # [tensors]
        first_block = torch.cumsum(blocks, 0) - blocks  # index of each tensor's first program
        self.num_blocks = int(blocks.sum())
        tensor_of_block = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), blocks)
        block_start = (torch.arange(self.num_blocks, dtype=torch.int64) - first_block[tensor_of_block]) * BLOCK
        self.block_tensor = tensor_of_block.to(torch.int32).to(device)  # [num_blocks]
        self.block_start = block_start.to(device)  # [num_blocks], elements into the tensor
        self.tensor_offset = torch.tensor(offsets, dtype=torch.int64).to(device)  # [tensors], into the partition
        self.tensor_numel = numel.to(device)  # [tensors]
        self.num_tensors = len(numels)
        self.end = max((o + n for o, n in zip(offsets, numels)), default=0)
        # every slice starts and ends on ALIGN elements: the kernel may then load and store whole vectors
        self.aligned = all(o % ALIGN == 0 and n % ALIGN == 0 for o, n in zip(offsets, numels))


def gathered_applies(optimizer: torch.optim.Optimizer, lp_targets: list[list[torch.Tensor]],
                     layouts: list[GradLayout]) -> bool:
    """Whether `step_gathered_` can update `optimizer`: `applies`, one flat parameter a group, its layout inside it."""
    return (applies(optimizer, lp_targets) and len(layouts) == len(optimizer.param_groups)
            and all(len(group["params"]) == 1 and layout.end <= group["params"][0].numel()
                    for group, layout in zip(optimizer.param_groups, layouts)))


def _address_table(grads: list[Optional[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, bool]:
    """The gradients' device addresses (0: no gradient) as an int64 device tensor, copied from pinned memory
    without waiting (the caching host allocator keeps the buffer until the copy has run), and whether every
    address is a multiple of 16 bytes."""
    addresses = [0 if grad is None else grad.data_ptr() for grad in grads]
    host = torch.tensor(addresses, dtype=torch.int64)
    aligned = all(address % 16 == 0 for address in addresses)
    if device.type != "cuda":  # Triton's interpreter (tests on CPU machines) reads host memory
        return host, aligned
    return host.pin_memory().to(device, non_blocking=True), aligned


@torch.no_grad()
def step_gathered_(optimizer: torch.optim.Adam, lp_targets: list[list[torch.Tensor]],
                   grads: list[list[Optional[torch.Tensor]]], layouts: list[GradLayout], found_inf: torch.Tensor,
                   grad_scale: Optional[torch.Tensor] = None) -> None:
    """`step_` for groups of one flat fp32 parameter each, whose gradient is not in `.grad` but in the separate
    tensors `grads[i]` (or None), laid out in it by `layouts[i]` (module docstring). The caller sees that the
    gradients are contiguous and of one dtype, bf16 or fp16 (bf16_optimizer_patches checks them each step)."""
    kernel, triton_dtypes = _kernel(gathered=True)
    found_inf = found_inf.to(torch.float32).reshape(())
    scale = grad_scale if grad_scale is not None else found_inf
    for group, targets, group_grads, layout in zip(optimizer.param_groups, lp_targets, grads, layouts):
        if len(group_grads) != layout.num_tensors:
            raise ValueError(f"{len(group_grads)} gradients for a layout of {layout.num_tensors} parameters")
        grad_dtype = next((grad.dtype for grad in group_grads if grad is not None), None)
        if grad_dtype is None or layout.num_blocks == 0:
            continue
        (param,), (target,) = group["params"], targets
        beta1, beta2 = group["betas"]
        state = _state(optimizer, param)
        state["step"] += 1.0 - found_inf
        addresses, aligned_addresses = _address_table(group_grads, param.device)
        kernel[(layout.num_blocks,)](
            param, addresses, layout.block_tensor, layout.block_start,
            layout.tensor_offset, layout.tensor_numel, state["exp_avg"], state["exp_avg_sq"], target,
            state["step"], found_inf, scale,
            float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            HAS_SCALE=grad_scale is not None, LP_DTYPE=triton_dtypes[target.dtype],
            GRAD_DTYPE=triton_dtypes[grad_dtype], BLOCK=BLOCK, ALIGNED=layout.aligned and aligned_addresses,
            num_warps=NUM_WARPS,
        )


try:  # optional: without Triton (CPU machines) `applies` says no and the caller keeps torch's step
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _kernel(gathered: bool = False):
    """(the Triton kernel, {torch dtype: triton dtype}), or None where Triton is not installed; `gathered`: the
    kernel that reads each parameter's gradient where it lies (`step_gathered_`)."""
    if triton is None:
        return None
    kernel = adamw_lp_gathered_kernel if gathered else adamw_lp_kernel
    return kernel, {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


if triton is not None:
    @triton.jit
    def _adamw(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        """The update of the module docstring on fp32 values; returns (param, exp_avg, exp_avg_sq)."""
        bias_correction1 = 1.0 - tl.exp2(step * tl.log2(beta1))  # 1 - beta1^t
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
        param = param - lr * weight_decay * param
        exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
        denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        param = param - (lr / bias_correction1) * exp_avg / denom
        return param, exp_avg, exp_avg_sq

    @triton.jit
    def _update_elements(index, inside, grad, param_ptr, exp_avg_ptr, exp_avg_sq_ptr, lp_ptr, step_ptr,
                         grad_scale_ptr, lr, beta1, beta2, eps, weight_decay,
                         HAS_SCALE: tl.constexpr, LP_DTYPE: tl.constexpr):
        """AdamW of the flat elements `index` (where `inside`) with fp32 gradients `grad`, and their rounded copy."""
        if HAS_SCALE:
            grad = grad / tl.load(grad_scale_ptr)
        param = tl.load(param_ptr + index, mask=inside)
        exp_avg = tl.load(exp_avg_ptr + index, mask=inside)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + index, mask=inside)
        param, exp_avg, exp_avg_sq = _adamw(param, grad, exp_avg, exp_avg_sq, tl.load(step_ptr), lr, beta1, beta2,
                                            eps, weight_decay)
        tl.store(param_ptr + index, param, mask=inside)
        tl.store(exp_avg_ptr + index, exp_avg, mask=inside)
        tl.store(exp_avg_sq_ptr + index, exp_avg_sq, mask=inside)
        tl.store(lp_ptr + index, param.to(LP_DTYPE, fp_downcast_rounding="rtne"), mask=inside)

    @triton.jit
    def adamw_lp_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, lp_ptr, numel,
                        step_ptr, found_inf_ptr, grad_scale_ptr,
                        lr, beta1, beta2, eps, weight_decay,
                        HAS_SCALE: tl.constexpr, LP_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """One AdamW step of elements [program * BLOCK, +BLOCK) and their rounded copy (module docstring)."""
        if tl.load(found_inf_ptr) == 0.0:
            index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2**31 elements
            inside = index < numel
            grad = tl.load(grad_ptr + index, mask=inside)
            _update_elements(index, inside, grad, param_ptr, exp_avg_ptr, exp_avg_sq_ptr, lp_ptr, step_ptr,
                             grad_scale_ptr, lr, beta1, beta2, eps, weight_decay, HAS_SCALE, LP_DTYPE)

    @triton.jit
    def adamw_lp_gathered_kernel(param_ptr, grad_addresses_ptr, block_tensor_ptr, block_start_ptr, tensor_offset_ptr,
                                 tensor_numel_ptr, exp_avg_ptr, exp_avg_sq_ptr, lp_ptr,
                                 step_ptr, found_inf_ptr, grad_scale_ptr,
                                 lr, beta1, beta2, eps, weight_decay,
                                 HAS_SCALE: tl.constexpr, LP_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
                                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        """The same step for one BLOCK slice of one parameter whose gradient is its own tensor (GradLayout).
        ALIGNED: offsets and sizes are multiples of 16 elements, addresses of 16 bytes (vector loads)."""
        if tl.load(found_inf_ptr) == 0.0:
            program = tl.program_id(0)
            tensor = tl.load(block_tensor_ptr + program)
            start = tl.load(block_start_ptr + program)  # element of the tensor, a multiple of BLOCK
            numel = tl.load(tensor_numel_ptr + tensor)
            offset = tl.load(tensor_offset_ptr + tensor)  # of the tensor's element 0 in the flat partition
            address = tl.load(grad_addresses_ptr + tensor)
            if ALIGNED:
                start = tl.multiple_of(start, BLOCK)
                numel = tl.multiple_of(numel, 16)
                offset = tl.multiple_of(offset, 16)
                address = tl.multiple_of(address, 16)
            local = start + tl.arange(0, BLOCK)  # int64 elements of the tensor
            inside = local < numel
            index = offset + local  # elements of the flat partition
            grad = tl.zeros([BLOCK], dtype=tl.float32)  # no gradient this step: a zero one
            if address != 0:
                grad = tl.load(address.to(tl.pointer_type(GRAD_DTYPE)) + local, mask=inside).to(tl.float32)
            _update_elements(index, inside, grad, param_ptr, exp_avg_ptr, exp_avg_sq_ptr, lp_ptr, step_ptr,
                             grad_scale_ptr, lr, beta1, beta2, eps, weight_decay, HAS_SCALE, LP_DTYPE)
