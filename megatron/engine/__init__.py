"""The DeepSpeed boundary: everything that builds, bends or inspects DeepSpeed lives here.

- `build.py`: `build_engine(args, model, device_type, parallel)` (our optimizer and LR schedule ->
  `deepspeed.initialize` -> the fixes below), `skip_allreduce_without_replicas`, what the engine reports
  (`engine_reports_grad_norm`, `reported_grad_norm`, `skipped_steps`).
- `distributed.py`: `init_distributed()` (deepspeed.init_distributed, nccl/gloo) and the release of the
  /dev/shm segments DeepSpeed's CPU all-reduce leaves (`release_cpu_shm_names`).
- `optimizer_kind.py`: `deepspeed_optimizer_kind(args)`, the wrapper DeepSpeed 0.19 picks (resume checks).
- `bf16_optimizer_patches.py`, `multi_tensor_add.py`: BF16_Optimizer's accumulation and step without
  per-parameter launches or host waits. `fp16_optimizer_init.py`: FP16_UnfusedOptimizer's build step undone.
- `version.py`: `check_deepspeed_version()`, the one version check (0.19.x, the release all of the above
  was written against).
"""

from megatron.engine.build import build_engine, skip_allreduce_without_replicas
from megatron.engine.optimizer_kind import OptimizerKind, deepspeed_optimizer_kind
from megatron.engine.version import DeepSpeedVersionError, check_deepspeed_version

__all__ = ["build_engine", "skip_allreduce_without_replicas", "OptimizerKind", "deepspeed_optimizer_kind",
           "DeepSpeedVersionError", "check_deepspeed_version"]
