"""fused_optimizer_step on the GPU (megatron/engine/fused_adamw.py, bf16_optimizer_patches item 5).

1. The kernel against torch's fused AdamW followed by the bf16 copy, over sizes that end inside a block or
   span many, with and without weight decay and the clipping divisor, through a skipped (found_inf) step:
   masters and moments within a few fp32 ulps (rtol 1e-6; torch rounds its powers and divisions in its own
   order), the step count equal, and the bf16 weights exactly the masters rounded to nearest.
2. A real BF16_Optimizer (bf16 weights, fp32 gradient sums, ZeRO 1, one NCCL rank, clipping on) steps the
   same with the fused kernel as with torch's (masters within rtol 1e-6 after one step), skips a nan step
   alike, the fused path is the one taken (torch's step is never called), the bf16 weights are the masters
   rounded, and the optimizer state has torch's keys, shapes and dtypes, so a checkpoint loads into either.
   With item 6 (AdamW reading the bf16 gradients, no fold into the fp32 sums) the same first step (the norm
   summed from the bf16 gradients: rtol 1e-6), also when two backwards come before a step (folded then).
3. The trainer (`deepy.py train.py`, bf16 with fp32 sums, ZeRO 1) takes the fused step by default on CUDA
   (the start-up line says so), and a run interrupted at step 3 and resumed has the same losses as the
   uninterrupted one, to the bit; `fused_optimizer_step: false` trains the same model (losses within 1%).
"""

import logging
import subprocess

import pytest
import torch
from torch import nn

from tests.e2e.harness import deepy_command, losses, read_metrics, write_config
from tests.helpers.distributed import join_single_nccl_rank

pytestmark = pytest.mark.gpu

SIZES = (1, 2047, 2048, 3 * 2048 + 5, 1_000_003)
NAN_STEP = 2


@pytest.fixture(autouse=True, scope="module")
def _nccl_rank():
    join_single_nccl_rank()


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
def test_kernel_equals_torch_fused_adamw_and_copy(clip):
    from megatron.engine import fused_adamw

    assert fused_adamw._kernel() is not None, "Triton is missing on the GPU machine"
    generator = torch.Generator(device="cuda").manual_seed(0)
    start = [torch.randn(n, device="cuda", generator=generator) for n in SIZES]
    ours = [nn.Parameter(p.clone()) for p in start]
    ref = [nn.Parameter(p.clone()) for p in start]

    def groups(params):
        return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]

    ours_opt = torch.optim.AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    lp = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for n in SIZES]
    targets = [lp[:3], lp[3:]]
    ref_lp = [torch.empty_like(t) for t in lp]
    for step in range(5):
        grads = [torch.randn(n, device="cuda", generator=generator) for n in SIZES]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        found_inf = torch.full((), 1.0 if step == 2 else 0.0, device="cuda")
        grad_scale = torch.full((), 1.7, device="cuda") if clip else None
        assert fused_adamw.applies(ours_opt, targets)
        fused_adamw.step_(ours_opt, targets, found_inf, grad_scale)
        ref_opt.found_inf, ref_opt.grad_scale = found_inf, grad_scale
        ref_opt.step()
        for weights, q in zip(ref_lp, ref):
            weights.copy_(q.detach())
    torch.cuda.synchronize()
    for index, (p, q) in enumerate(zip(ours, ref)):
        mine, theirs = ours_opt.state[p], ref_opt.state[q]
        assert torch.equal(mine["step"], theirs["step"]) and float(mine["step"]) == 4.0, index  # one skipped
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"param {index}")
        # the moments are ~0.1-1 (m) and ~0.05 (v) here: fp32's default tolerance (rtol 1.3e-6, atol 1e-5)
        torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"])
        torch.testing.assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"])
        assert torch.equal(lp[index], p.detach().to(torch.bfloat16)), f"bf16 weights {index} are not the masters"


def test_a_skipped_first_step_leaves_everything_untouched():
    from megatron.engine import fused_adamw

    param = nn.Parameter(torch.randn(5000, device="cuda"))
    before = param.detach().clone()
    param.grad = torch.full_like(param, float("nan"))
    optimizer = torch.optim.AdamW([param], lr=1e-2, fused=True)
    lp = torch.zeros(5000, device="cuda", dtype=torch.bfloat16)
    fused_adamw.step_(optimizer, [[lp]], torch.ones((), device="cuda"))
    state = optimizer.state[param]
    assert torch.equal(param.detach(), before) and float(state["step"]) == 0.0
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any() and not lp.any()


def _train(fused: bool, steps: int = NAN_STEP + 1, direct: bool = False, backwards_per_step: int = 1):
    import deepspeed

    from megatron.engine import bf16_optimizer_patches

    deepspeed.utils.logger.setLevel(logging.ERROR)
    bf16_optimizer_patches.install()
    torch.manual_seed(0)
    width = 512
    module = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, width, bias=False)).cuda()
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.5,
              "bf16": {"enabled": True, "check_grad_overflow": False}, "data_types": {"grad_accum_dtype": "fp32"}}
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, fused=True)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    if fused:
        assert bf16_optimizer_patches.enable_fused_step(engine.optimizer)

        def not_here(*args, **kwargs):
            raise AssertionError("torch's AdamW step ran although the fused step is on")

        engine.optimizer.optimizer.step = not_here
    folds = []
    if direct:  # item 6: AdamW reads the bf16 gradients; the fold into the fp32 sums must not run at one backward
        assert bf16_optimizer_patches.enable_lp_grad_step(engine.optimizer)
        fold = bf16_optimizer_patches._fold_lp_grads

        def counted_fold(self):
            folds.append(1)
            return fold(self)

        bf16_optimizer_patches._fold_lp_grads = counted_fold
    generator = torch.Generator(device="cuda").manual_seed(1)
    losses = []
    masters = [torch.cat([p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition])]  # before
    for step in range(steps):
        x = torch.randn(8, 64, width, device="cuda", generator=generator).bfloat16()
        loss = engine(x).float().pow(2).mean()
        for _ in range(backwards_per_step - 1):  # more backwards than configured before a step
            engine.backward(engine(x).float().pow(2).mean())
        engine.backward(loss * float("nan") if step == NAN_STEP else loss)  # a skipped step on both sides
        engine.step()
        losses.append(float(loss))
        masters.append(torch.cat([p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition]))
    skipped = bf16_optimizer_patches.nonfinite_steps(engine.optimizer)
    weights = torch.cat([flat.detach().float() for flat in engine.optimizer.bf16_groups_flat])  # same layout
    state = {key: (tuple(value.shape), value.dtype, value.device.type)
             for group_state in engine.optimizer.optimizer.state_dict()["state"].values()
             for key, value in group_state.items()}
    bf16_optimizer_patches.uninstall()
    if direct:
        bf16_optimizer_patches._fold_lp_grads = fold
        expected_folds = 0 if backwards_per_step == 1 else steps * backwards_per_step
        assert len(folds) == expected_folds, f"{len(folds)} folds, {expected_folds} expected"
    del engine, optimizer
    assert skipped == 1, f"{skipped} steps skipped (fused={fused}), 1 expected"
    return losses, masters, weights, state


def test_bf16_optimizer_steps_the_same_with_the_fused_kernel():
    """One step from the same weights and gradients (later steps would compare chaos: a master that rounds
    to the other bf16 neighbour changes the next gradients, and Adam turns tiny gradient changes into
    lr-sized steps), then a nan step that both skip."""
    ref_losses, ref_masters, ref_weights, ref_state = _train(fused=False)
    losses, masters, weights, state = _train(fused=True)
    assert losses[0] == ref_losses[0]  # the same forward before any step
    assert torch.equal(masters[0], ref_masters[0])  # masters[i]: after i steps
    assert not torch.equal(masters[1], masters[0]), "the first step did not move the masters"
    torch.testing.assert_close(masters[1], ref_masters[1], rtol=1e-6, atol=1e-7)
    assert torch.equal(masters[NAN_STEP + 1], masters[NAN_STEP]), "the nan step moved the masters"
    assert torch.equal(weights, masters[-1].to(torch.bfloat16).float()), "bf16 weights are not the rounded masters"
    assert state == ref_state


@pytest.mark.parametrize("backwards_per_step", [1, 2])
def test_the_fused_kernel_reading_the_bf16_gradients_steps_the_same(backwards_per_step):
    """Item 6 against item 5 alone: the same first step (masters within rtol 1e-6: the norm now sums bf16
    gradients, in fp32, where it summed their fp32 copies), the nan step skipped, the bf16 weights the
    rounded masters, the same optimizer state. With two backwards before a step, the waiting bf16 gradients
    are folded into the fp32 sums first and the step is item 5's."""
    ref_losses, ref_masters, ref_weights, ref_state = _train(fused=True, backwards_per_step=backwards_per_step)
    losses, masters, weights, state = _train(fused=True, direct=True, backwards_per_step=backwards_per_step)
    assert losses[0] == ref_losses[0]
    assert not torch.equal(masters[1], masters[0]), "the first step did not move the masters"
    torch.testing.assert_close(masters[1], ref_masters[1], rtol=1e-6, atol=1e-7)
    assert torch.equal(masters[NAN_STEP + 1], masters[NAN_STEP]), "the nan step moved the masters"
    assert torch.equal(weights, masters[-1].to(torch.bfloat16).float()), "bf16 weights are not the rounded masters"
    assert state == ref_state


BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
        "torch_compile": False,  # (compiling the tiny model would only cost time here)
        "sdpa_backend": "math"}  # attention from plain GEMMs: no atomics in its backward, so a bit-for-bit
# comparison tests the optimizer, not the attention kernel's determinism


def _run(tmp_path, name: str, overrides: dict) -> tuple[dict, str]:
    path, config = write_config(tmp_path, name, {**BF16, **overrides})
    proc = subprocess.run(**deepy_command(path), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed:\n{output[-6000:]}"
    return losses(read_metrics(config["log_dir"], "train")), output


def test_the_trainer_takes_the_fused_step_and_resumes_bit_for_bit(tmp_path):
    plain, output = _run(tmp_path, "plain", {"train_iters": 6})
    assert "fused_optimizer_step: AdamW and the bf16 weight copy run as one Triton kernel" in output, output[-4000:]
    assert "reading the bf16 gradients where autograd left them" in output, output[-4000:]  # one GPU, one micro-batch
    save = str(tmp_path / "ckpt")
    first, _ = _run(tmp_path, "first", {"train_iters": 3, "save": save, "checkpoint_factor": 3})
    resumed, _ = _run(tmp_path, "resumed", {"train_iters": 6, "load": save})
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    assert {**first, **resumed} == plain
    unfused, output = _run(tmp_path, "unfused", {"train_iters": 6, "fused_optimizer_step": False})
    assert "fused_optimizer_step: AdamW" not in output
    assert unfused[1] == plain[1]  # before any step
    for it in plain:
        assert unfused[it] == pytest.approx(plain[it], rel=1e-2), (it, unfused[it], plain[it])
