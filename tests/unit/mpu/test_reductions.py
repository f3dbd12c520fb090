"""megatron/mpu/reductions.py in one process: the grad norm counts each parameter once (a pipeline
duplicate not at all); the data-parallel mean is the identity without groups.
(The multi-process sums over tensor and pipeline groups are checked in tests/distributed/test_pipeline.py.)"""

import torch

from megatron.mpu import ParallelState
from megatron.mpu.reductions import PIPELINE_DUPLICATE, data_parallel_mean, grad_norm


def test_grad_norm_is_the_l2_norm_and_skips_pipeline_duplicates():
    a, b, dup = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad, dup.grad = torch.tensor([3.0, 0, 0]), torch.tensor([0, 4.0, 0]), torch.tensor([100.0, 0, 0])
    setattr(dup, PIPELINE_DUPLICATE, True)
    no_grad = torch.nn.Parameter(torch.zeros(2))
    assert float(grad_norm([a, b, dup, no_grad], ParallelState.single())) == 5.0


def test_single_process_reductions_are_identities():
    state = ParallelState.single()
    assert data_parallel_mean(torch.tensor(2.5), state) == 2.5
