"""The one object that owns the parallel degrees: tensor (tp) x pipeline (pp) x data (dp) = world size.

Rank layout (DeepSpeed's `PipeModelDataParallelTopology`: axes pipe, data, model, the model = tensor axis
varying fastest, so a tensor group is adjacent ranks on one node):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

`Topology.for_world(world_size, tp, pp)` derives dp and refuses a world size that tp x pp does not divide,
showing every factor; `groups(axis)` lists the ranks of every group along an axis ("tp", "dp", "pp", or
"model" = pipe x tensor, DeepSpeed's model-parallel group), which `mpu.initialize_model_parallel` creates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

AXES = ("tp", "dp", "pp", "model")


@dataclass(frozen=True)
class Topology:
    tp: int
    pp: int
    dp: int

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Topology: {name} must be a positive integer, got {value!r}")

    @classmethod
    def for_world(cls, world_size: int, tp: int, pp: int = 1) -> "Topology":
        """The topology with dp = world_size / (tp x pp); pp 0 means 1 (no pipeline)."""
        pp = max(int(pp), 1)
        if tp < 1 or world_size < 1 or world_size % (tp * pp) != 0:
            raise ValueError(
                f"world size {world_size} is not tensor-parallel {tp} x pipeline-parallel {pp} x data-parallel dp "
                f"for any whole dp: {world_size} / ({tp} x {pp}) = {world_size / max(tp * pp, 1):g}. Choose "
                f"model_parallel_size and pipe_parallel_size whose product divides {world_size}, or a world "
                f"size that is a multiple of {tp * pp}.")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size}")
        pp_rank, rest = divmod(rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return tp_rank, dp_rank, pp_rank

    def groups(self, axis: str) -> List[List[int]]:
        """Every group along `axis`, each a list of global ranks, in the order all ranks create them."""
        r = self.rank
        if axis == "tp":
            return [[r(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]
        if axis == "dp":
            return [[r(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]
        if axis == "pp":
            return [[r(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]
        if axis == "model":
            return [sorted(r(t, d, p) for p in range(self.pp) for t in range(self.tp)) for d in range(self.dp)]
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
