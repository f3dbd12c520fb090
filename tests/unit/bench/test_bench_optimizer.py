"""tools/bench/bench_optimizer.py: the two groups it steps are the model's parameters, in order, split as the
optimizer splits them (matrices decayed, 1-D parameters not), and it refuses to run off CUDA."""

import os
import sys

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "bench")))

import bench_optimizer  # noqa: E402
from bench_gemm import bench_args  # noqa: E402

from megatron.launcher.dry_run import meta_model, parameter_counts  # noqa: E402
from megatron.training.optimizer import param_groups  # noqa: E402


@pytest.mark.parametrize("size", ["tiny", "llama-1B"])
def test_groups_are_the_optimizers_split_of_every_parameter(size):
    args = bench_args(size, 64, 2, "cpu")
    numels = bench_optimizer.group_numels(args)
    assert sum(map(sum, numels)) == parameter_counts(args)["total"]
    model, _ = meta_model(args)
    want = [[p.numel() for p in group["params"]] for group in param_groups(model, weight_decay=0.1)]
    assert numels == want and len(numels) == 2


def test_refused_off_cuda():
    with pytest.raises(SystemExit, match="CUDA kernel"):
        bench_optimizer.main(["--sizes", "tiny", "--device", "cpu"])
