"""megatron/engine/bf16_optimizer_patches.py inside a real BF16_Optimizer (bf16 weights, fp32 gradient
accumulation, ZeRO 1, one gloo rank, AdamW, three micro-batches per step, three or four steps).

- Accumulation (`backward_prologue`, `update_hp_grads`, `clear_hp_grads`): with an unfused AdamW
  (DeepSpeed's own step runs) the fp32 gradient sums, the fp32 master weights and the bf16 weights are bit
  for bit DeepSpeed's, with its default accumulation after backward and with `bf16.immediate_grad_update`
  (which keeps DeepSpeed's path), on one rank and on two data-parallel ranks (the gradient all-reduce
  between backward and step). A side branch skipped by whole steps and by a step's first micro-batch, and
  (with the step below) an optimizer step with no backward before it, check that ours, which does not
  zero-fill the fp32 sums after a step, never reads a stale sum.
- Step (`step`, fused AdamW): with clipping active and one step whose gradients are nan, the masters and
  weights match DeepSpeed's step to fp32 rounding (rtol 1e-5: the clip is one division instead of one
  multiplication), the nan step changes nothing in either, and it is counted (`nonfinite_steps` ours,
  `engine.skipped_steps` DeepSpeed's). The step reads nothing from the device: every tensor-to-host
  conversion raises while it runs. On two tensor-parallel ranks (one sharded parameter, different on each
  rank, and replicated ones counted on rank 0 only) its norm and updates match DeepSpeed's the same way.
- Freed sums (`free_grad_sums_between_steps`): bit for bit the same as kept ones, with both steps, on one
  rank and on two data-parallel ranks (each rank's partition views retaken with the buffer); the buffers
  hold no memory after a step and are back within the next one.
"""

import contextlib

import pytest
import torch
from torch import nn

from tests.helpers.distributed import run_distributed

NAN_STEP = 2


def _uses_side(step: int, micro: int) -> bool:
    """Which micro-batches reach the side branch: all of step 0, none of step 1 (its fp32 sum must read
    zero, not step 0's), only the second of step 2 (no gradient at the step's first micro-batch)."""
    return step == 0 or (step == 2 and micro == 1) or step > 2


class _Net(nn.Module):
    """A small MLP plus a side branch whose parameters get no gradient in the micro-batches that skip it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4), nn.LayerNorm(4))
        self.side = nn.Linear(8, 4)
        self.use_side = True

    def forward(self, x):
        y = self.body(x)
        return y + self.side(x) if self.use_side else y


def _engine(state, immediate: bool, fused: bool, clip: float):
    import deepspeed

    torch.manual_seed(0)
    module = _Net()
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": clip, "bf16": {"enabled": True, "immediate_grad_update": immediate},
              "data_types": {"grad_accum_dtype": "fp32"}}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, fused=fused)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, mpu=state.deepspeed_mpu())
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    return engine


@contextlib.contextmanager
def _no_host_reads():
    """Every way a tensor's value reaches Python raises inside this block."""
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor inside the optimizer step")

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _train(state, ours: bool, immediate: bool = False, fused: bool = False, clip: float = 1.0, steps: int = 3,
           nan_step: int | None = None, step_without_backward: bool = False, free_sums: bool = False):
    from megatron.engine import bf16_optimizer_patches

    bf16_optimizer_patches.install() if ours else bf16_optimizer_patches.uninstall()
    engine = _engine(state, immediate, fused, clip)
    if free_sums:
        assert bf16_optimizer_patches.enable_free_grad_sums(engine.optimizer)
    generator = torch.Generator().manual_seed(1)
    grad_sums, masters, norms, allocated = [], [], [], []
    for step in range(steps):
        for micro in range(3):
            x = torch.randn(4, 8, generator=generator)
            engine.module.use_side = _uses_side(step, micro)
            loss = engine(x.bfloat16()).float().pow(2).mean() * 20.0
            if step == nan_step and micro == 1:
                loss = loss * float("nan")
            engine.backward(loss)
            if micro == 2:  # the fp32 sums the optimizer is about to use
                grad_sums.append(torch.cat([g.clone() for g in engine.optimizer.fp32_groups_gradients_flat]))
            boundary = micro == 2 and ours and fused
            with _no_host_reads() if boundary else contextlib.nullcontext():
                engine.step()
            if ours:  # (after backward, step) of each micro-batch: do the fp32 sums hold memory?
                allocated.append(bf16_optimizer_patches.hp_grads_allocated(engine.optimizer))
        masters.append(torch.cat([p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition]))
        norms.append(float(engine.get_global_grad_norm()))
    extra = {}
    if step_without_backward:  # the sums must read zero, not the last step's (ours no longer zero-fills them)
        engine.optimizer.step()
        extra = {"norm_after_step_without_backward": float(engine.optimizer._global_grad_norm)}
        if not free_sums:  # (freed sums hold no memory after the step: nothing to read)
            extra["sums_after_step_without_backward"] = torch.cat(
                [g.clone() for g in engine.optimizer.fp32_groups_gradients_flat])
    weights = [p.detach().clone() for p in engine.module.parameters()]
    skipped = (bf16_optimizer_patches.nonfinite_steps(engine.optimizer) if ours else 0) + engine.skipped_steps
    bf16_optimizer_patches.uninstall()
    return {"grad_sums": grad_sums, "masters": masters, "weights": weights, "norms": norms, "skipped": skipped,
            "allocated": allocated, **extra}


def _check_install(rank, world_size):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from megatron.engine import bf16_optimizer_patches as patches

    names = ("backward_prologue", "update_hp_grads", "clear_hp_grads", "step")
    originals = [getattr(BF16_Optimizer, name) for name in names]
    assert patches.install()
    assert [getattr(BF16_Optimizer, name) for name in names] == [getattr(patches, name) for name in names]
    assert patches.install()  # idempotent: the originals kept are still DeepSpeed's
    patches.uninstall()
    assert [getattr(BF16_Optimizer, name) for name in names] == originals
    return "ok"


def _check_accumulation(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    for immediate in (False, True):
        want = _train(state, ours=False, immediate=immediate)
        got = _train(state, ours=True, immediate=immediate)
        for name in ("grad_sums", "masters", "weights"):
            for index, (g, w) in enumerate(zip(got[name], want[name])):
                assert torch.equal(g, w), f"{name} [{index}] differ (immediate_grad_update={immediate})"
        assert any(s.abs().sum() > 0 for s in got["grad_sums"]), "no gradient reached the fp32 buffer"
    return "ok"


def _check_data_parallel(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    assert state.dp_size == 2
    want = _train(state, ours=False)
    got = _train(state, ours=True)
    # the sums freed between steps (the default at one micro-batch per step): each rank's partition views
    # of the flat buffer are retaken with it, so the reduced sums and the sharded step are the same
    freed = _train(state, ours=True, free_sums=True)
    assert freed["allocated"] == [True, True, False] * (len(freed["allocated"]) // 3), freed["allocated"]
    for name in ("grad_sums", "masters", "weights"):
        for index, (g, w, f) in enumerate(zip(got[name], want[name], freed[name])):
            assert torch.equal(g, w), f"rank {rank}: {name} [{index}] differ"
            assert torch.equal(f, w), f"rank {rank}: {name} [{index}] differ with the sums freed"
    return "ok"


def _check_step(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu
    from megatron.engine import bf16_optimizer_patches

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    engine = _engine(state, immediate=False, fused=True, clip=1.0)
    assert bf16_optimizer_patches.supports_sync_free_step(engine.optimizer)
    assert not bf16_optimizer_patches.supports_sync_free_step(_engine(state, False, fused=False, clip=1.0).optimizer)
    # fused_optimizer_step: its kernel is CUDA's, so on this CPU engine null leaves it off and true is refused
    from megatron.engine.build import enable_fused_step

    assert not bf16_optimizer_patches.enable_fused_step(engine.optimizer)
    assert not enable_fused_step(engine.optimizer, rank=0, required=False, one_micro_batch=True)
    # item 6 needs item 5's kernel: off here, so the sums are filled as before
    assert not bf16_optimizer_patches.enable_lp_grad_step(engine.optimizer)
    assert getattr(engine.optimizer, "_lp_grad_layouts", None) is None
    with pytest.raises(RuntimeError, match="fused_optimizer_step: true, but it cannot run here: the optimizer runs on "
                                           "cpu, the kernel needs CUDA; set fused_optimizer_step: false"):
        enable_fused_step(engine.optimizer, rank=0, required=True)

    clip = 0.5
    want = _train(state, ours=False, fused=True, clip=clip, steps=4, nan_step=NAN_STEP)
    got = _train(state, ours=True, fused=True, clip=clip, steps=4, nan_step=NAN_STEP)
    finite_norms = [n for i, n in enumerate(want["norms"]) if i != NAN_STEP]
    assert max(finite_norms) > clip, f"clipping never acted (norms {finite_norms})"
    for index, (g, w) in enumerate(zip(got["norms"], want["norms"])):
        if index != NAN_STEP:
            assert g == pytest.approx(w, rel=1e-5), f"grad norm of step {index}: {g} vs DeepSpeed's {w}"
    assert got["norms"][NAN_STEP] != got["norms"][NAN_STEP]  # nan, read at log time
    assert want["skipped"] == 1 and got["skipped"] == 1
    for run in (got, want):  # the nan step left the masters as they were
        assert torch.equal(run["masters"][NAN_STEP], run["masters"][NAN_STEP - 1])
    for name in ("masters", "weights"):
        for index, (g, w) in enumerate(zip(got[name], want[name])):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"{name} [{index}] differ")
    assert not torch.equal(got["masters"][-1], got["masters"][0]), "the last steps did not move the weights"
    # a step with no backward since the last one (DeepSpeed's own step fails there: no gradient to take a
    # norm of) sees zero sums, not the previous step's
    alone = _train(state, ours=True, fused=True, clip=clip, steps=2, step_without_backward=True)
    assert alone["norm_after_step_without_backward"] == 0.0
    assert not alone["sums_after_step_without_backward"].any()
    return "ok"


def _check_free_grad_sums(rank, world_size):
    """free_grad_sums_between_steps: the same sums, masters and weights bit for bit as keeping them (and as
    DeepSpeed's with its own step), the buffers empty after every optimizer step and full within one."""
    import logging

    import deepspeed

    from megatron import mpu
    from megatron.engine import bf16_optimizer_patches

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(1)
    deepspeeds = _train(state, ours=False, steps=4)
    for fused in (False, True):
        kept = _train(state, ours=True, fused=fused, steps=4, nan_step=NAN_STEP if fused else None)
        freed = _train(state, ours=True, fused=fused, steps=4, nan_step=NAN_STEP if fused else None, free_sums=True)
        for name in ("grad_sums", "masters", "weights"):
            for index, (g, w) in enumerate(zip(freed[name], kept[name])):  # bitwise; the nan step's sums nan alike
                torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f"{name} [{index}] (fused={fused})")
        assert freed["norms"][:NAN_STEP] == kept["norms"][:NAN_STEP] and freed["skipped"] == kept["skipped"]
        # 3 micro-batches a step: held after the first two, handed back after the step at the third
        assert freed["allocated"] == [True, True, False] * 4, freed["allocated"]
        assert all(kept["allocated"])
        if not fused:  # DeepSpeed's own step: the same as DeepSpeed's run with nothing freed
            for name in ("grad_sums", "masters", "weights"):
                for g, w in zip(freed[name], deepspeeds[name]):
                    assert torch.equal(g, w), f"{name} differ from DeepSpeed's"
    # a step with no backward since the last one re-takes the memory and sees zero sums (norm 0)
    alone = _train(state, ours=True, fused=True, steps=2, step_without_backward=True, free_sums=True)
    assert alone["norm_after_step_without_backward"] == 0.0
    # DeepSpeed's hooks fill the sums during backward: nothing to free
    bf16_optimizer_patches.install()
    assert not bf16_optimizer_patches.enable_free_grad_sums(_engine(state, immediate=True, fused=True, clip=1.0).optimizer)
    bf16_optimizer_patches.uninstall()
    return "ok"


class _ShardedBlock(nn.Module):
    """A replicated linear layer and a parameter marked as a tensor-parallel shard (rank-specific values)."""

    def __init__(self, rank: int):
        super().__init__()
        self.replicated = nn.Linear(8, 8)
        generator = torch.Generator().manual_seed(100 + rank)
        self.shard = nn.Parameter(torch.randn(8, 8, generator=generator))
        self.shard.tensor_model_parallel = True

    def forward(self, x):
        return self.replicated(x) @ self.shard


def _train_tensor_parallel(state, rank: int, ours: bool) -> dict:
    import deepspeed

    from megatron.engine import bf16_optimizer_patches

    bf16_optimizer_patches.install() if ours else bf16_optimizer_patches.uninstall()
    torch.manual_seed(0)
    module = _ShardedBlock(rank)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 1}, "gradient_clipping": 0.5, "bf16": {"enabled": True},
              "data_types": {"grad_accum_dtype": "fp32"}}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, fused=True)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, mpu=state.deepspeed_mpu())
    generator = torch.Generator().manual_seed(1)  # the same batches on both tensor ranks
    norms, masters = [], []
    for _ in range(3):
        for _ in range(2):
            engine.backward(engine(torch.randn(4, 8, generator=generator).bfloat16()).float().pow(2).mean())
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        masters.append(torch.cat([p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition]))
    bf16_optimizer_patches.uninstall()
    return {"norms": norms, "masters": masters}


def _check_step_tensor_parallel(rank, world_size):
    import logging

    import deepspeed

    from megatron import mpu

    deepspeed.utils.logger.setLevel(logging.ERROR)
    state = mpu.initialize_model_parallel(2)
    assert state.tp_size == 2 and state.dp_size == 1
    want = _train_tensor_parallel(state, rank, ours=False)
    got = _train_tensor_parallel(state, rank, ours=True)
    assert max(want["norms"]) > 0.5, f"clipping never acted (norms {want['norms']})"
    assert got["norms"] == pytest.approx(want["norms"], rel=1e-5), (got["norms"], want["norms"])
    for index, (g, w) in enumerate(zip(got["masters"], want["masters"])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: masters [{index}] differ")
    return got["norms"]


def test_install_replaces_and_restores_the_methods():
    assert run_distributed(_check_install, 1, timeout=300) == ["ok"]


def test_bf16_optimizer_accumulation_is_bitwise_deepspeeds():
    assert run_distributed(_check_accumulation, 1, timeout=300) == ["ok"]


def test_bf16_optimizer_accumulation_with_two_replicas_is_bitwise_deepspeeds_also_with_freed_sums():
    assert run_distributed(_check_data_parallel, 2, timeout=300) == ["ok", "ok"]


def test_sync_free_step_matches_deepspeeds_and_skips_nan_steps():
    assert run_distributed(_check_step, 1, timeout=300) == ["ok"]


def test_sync_free_step_matches_deepspeeds_over_two_tensor_ranks():
    norms_rank0, norms_rank1 = run_distributed(_check_step_tensor_parallel, 2, timeout=300)
    assert norms_rank0 == norms_rank1  # one global norm: both shards and the replicated grads, counted once


def test_freed_grad_sums_between_steps_change_nothing_and_hold_no_memory_between_steps():
    assert run_distributed(_check_free_grad_sums, 1, timeout=300) == ["ok"]
