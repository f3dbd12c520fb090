"""megatron/mpu/topology.py: our rank layout is DeepSpeed's PipeModelDataParallelTopology, and a world size
that tp x pp does not divide is refused with every factor in the message."""

import pytest

from megatron.mpu.topology import Topology

deepspeed = pytest.importorskip("deepspeed")


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (2, 2, 2), (4, 2, 3), (1, 2, 4)])
def test_rank_layout_is_deepspeeds(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ours = Topology(tp=tp, pp=pp, dp=dp)
    theirs = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    assert ours.world_size == theirs.world_size()
    for rank in range(ours.world_size):
        coord = theirs.get_coord(rank)
        assert ours.coords(rank) == (coord.model, coord.data, coord.pipe)
        assert ours.rank(coord.model, coord.data, coord.pipe) == rank
    for axis, theirs_axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe")):
        assert sorted(map(sorted, ours.groups(axis))) == sorted(map(sorted, theirs.get_axis_comm_lists(theirs_axis)))


def test_world_size_mismatch_names_every_factor():
    assert Topology.for_world(8, 2, 2) == Topology(tp=2, pp=2, dp=2)
    assert Topology.for_world(4, 2, 0).pp == 1
    with pytest.raises(ValueError) as err:
        Topology.for_world(6, 2, 2)
    message = str(err.value)
    assert "world size 6" in message and "tensor-parallel 2 x pipeline-parallel 2" in message
    assert "6 / (2 x 2) = 1.5" in message and "multiple of 4" in message
    with pytest.raises(ValueError, match="positive integer"):
        Topology(tp=0, pp=1, dp=1)
