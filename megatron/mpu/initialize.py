"""Process groups for tensor, pipeline and data parallelism, owned by one `ParallelState`.

Rank layout (the same as DeepSpeed's `PipeModelDataParallelTopology`, axes `['pipe', 'data', 'model']`,
with the model (= tensor) axis varying fastest):

    rank = pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank

so the ranks of one tensor-parallel group are adjacent (on one node, where NVLink is). Example with
world_size 8, tp 2, pp 2 (dp 2):

    tp groups: [0,1] [2,3] [4,5] [6,7]      dp groups: [0,2] [1,3] [4,6] [5,7]
    pp groups: [0,4] [1,5] [2,6] [3,7]

There are no module-level groups: `initialize_model_parallel` returns a `ParallelState` that is handed
to whoever needs it. `ParallelState.single()` is the size-1 state with `None` groups; every mpu
collective is the identity on a `None` or size-1 group, so the layers run without torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch.distributed as dist

from .topology import Topology


@dataclass
class ParallelState:
    """The parallel degrees, this process's coordinates, and the process groups.

    Groups are `torch.distributed` process groups, or `None` in the single-process state.
    `tp_ranks`, `dp_ranks`, `pp_ranks` list the global ranks of this process's groups; `model_group`
    (with `model_ranks`) is every rank with the same data-parallel coordinate (pipe x tensor), which
    is what DeepSpeed calls the "model parallel" group (it equals the tensor group when pp_size == 1).
    """

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    world_size: int
    rank: int
    sequence_parallel: bool = False
    tp_ranks: List[int] = field(default_factory=lambda: [0])
    dp_ranks: List[int] = field(default_factory=lambda: [0])
    pp_ranks: List[int] = field(default_factory=lambda: [0])
    model_group: Any = None
    model_ranks: List[int] = field(default_factory=lambda: [0])

    @classmethod
    def single(cls, sequence_parallel: bool = False) -> "ParallelState":
        """A size-1 state with `None` groups: no torch.distributed needed (tests, tools, conversion)."""
        return cls(tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                   tp_group=None, pp_group=None, dp_group=None, world_size=1, rank=0,
                   sequence_parallel=sequence_parallel)

    @property
    def topology(self) -> Topology:
        """The degrees and rank layout (megatron/mpu/topology.py)."""
        return Topology(tp=self.tp_size, pp=self.pp_size, dp=self.dp_size)

    def deepspeed_mpu(self) -> "DeepSpeedMPU":
        """The object `deepspeed.initialize(mpu=...)` expects (see `DeepSpeedMPU`)."""
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """Adapter answering the `mpu.get_*` calls DeepSpeed 0.19 makes (engine, ZeRO, grad norm, checkpoints).

    Meanings follow DeepSpeed's own `PipelineParallelGrid`:
      - "model parallel" = every rank sharing this data-parallel coordinate (pipe x tensor); DeepSpeed
        all-reduces overflow flags and grad norms over it. With pp_size == 1 it is the tensor group.
      - "tensor model parallel" / "slice parallel" = the tensor group. DeepSpeed's grad norm counts a
        parameter without `tensor_model_parallel=True` only on tensor rank 0, so replicated parameters
        are counted once and sharded ones on every rank.
      - "pipe" / "pipeline model parallel" = the pipeline group.
    It deliberately has no `get_sequence_parallel_*` / `initialize_sequence_parallel`: in DeepSpeed those
    mean Ulysses sequence parallelism (a separate group that divides the data-parallel world), not
    Megatron's sequence parallelism, which lives inside the tensor group and is invisible to DeepSpeed.
    """

    def __init__(self, state: ParallelState):
        self.state = state

    # -- model parallel (pipe x tensor), DeepSpeed's overflow / grad-norm group --
    def get_model_parallel_rank(self) -> int:
        return self.state.model_ranks.index(self.state.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.state.tp_size * self.state.pp_size

    def get_model_parallel_group(self):
        return self.state.model_group

    # -- tensor model parallel (Megatron-style slicing) --
    def get_tensor_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.state.tp_size

    def get_tensor_model_parallel_group(self):
        return self.state.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor rank 0 in this process's tensor group."""
        return self.state.tp_ranks[0]

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # -- data parallel --
    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp_size

    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self.state.dp_ranks)

    # -- pipeline --
    def get_pipe_parallel_rank(self) -> int:
        return self.state.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.state.pp_size

    def get_pipe_parallel_group(self):
        return self.state.pp_group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group

    def get_global_rank(self) -> int:
        return self.state.rank


def global_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp_size: int, dp_size: int) -> int:
    """rank = pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank (tensor axis fastest)."""
    return pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank


def initialize_model_parallel(tp_size: int, pp_size: int = 1,
                              sequence_parallel: bool = False) -> ParallelState:
    """Build the tensor, pipeline, data and DeepSpeed "model" groups and return this rank's state.

    Needs `torch.distributed` initialized (nccl or gloo). Every rank creates every group, in the same
    order, as `new_group` requires. `pp_size` 0 means no pipeline (as the config's `pipe_parallel_size`).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed initialized first "
                           "(torch.distributed.init_process_group); for one process use ParallelState.single().")
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    if int(tp_size) < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}.")
    topology = Topology.for_world(world_size, int(tp_size), int(pp_size))
    tp_size, pp_size, dp_size = topology.tp, topology.pp, topology.dp
    tp_rank, dp_rank, pp_rank = topology.coords(rank)

    found = {}

    def build(name: str, rank_lists: List[List[int]]) -> None:
        for ranks in rank_lists:
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                found[name] = (group, ranks)

    for axis in ("tp", "dp", "pp"):
        build(axis, topology.groups(axis))
    if pp_size > 1:
        build("model", topology.groups("model"))
    else:
        found["model"] = found["tp"]

    return ParallelState(
        tp_size=tp_size, pp_size=pp_size, dp_size=dp_size,
        tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        tp_group=found["tp"][0], pp_group=found["pp"][0], dp_group=found["dp"][0],
        world_size=world_size, rank=rank, sequence_parallel=bool(sequence_parallel),
        tp_ranks=found["tp"][1], dp_ranks=found["dp"][1], pp_ranks=found["pp"][1],
        model_group=found["model"][0], model_ranks=found["model"][1])
