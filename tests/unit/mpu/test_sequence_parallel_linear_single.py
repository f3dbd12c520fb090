"""`linear_with_sequence_parallel_gather` and ColumnParallelLinear(sequence_parallel=True) in one process
(`None` group): plain F.linear (same output and gradients, bit for bit)."""

import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.mpu.sequence_parallel_linear import linear_with_sequence_parallel_gather


def test_single_process_is_plain_linear():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 2, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True), torch.randn(3)
    y = linear_with_sequence_parallel_gather(x, w, b, None)
    assert torch.equal(y, F.linear(x, w, b))
    y.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.linear(x, w, b).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


def test_column_parallel_sequence_parallel_without_group_equals_linear():
    torch.manual_seed(1)
    col = mpu.ColumnParallelLinear(5, 4, tp_group=None, sequence_parallel=True)
    x = torch.randn(6, 2, 5)
    assert torch.equal(col(x), F.linear(x, col.weight, col.bias))
