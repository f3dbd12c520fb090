"""World size from the launcher keys: hostfile, include/exclude, num_nodes, num_gpus."""

import pytest

from megatron.neox_args import ConfigError, NeoXArgs
from megatron.neox_args.sections import LauncherArgs
from megatron.neox_args.world_size import compute_world_size, parse_hostfile, select_resources, visible_gpu_count

HOSTS = "# cluster\nnode1 slots=4\nnode2 slots=4\n\nnode3 slots=2  # small one\n"


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text(HOSTS)
    return str(path)


def test_parse_hostfile(hostfile, tmp_path):
    assert parse_hostfile(hostfile) == {"node1": 4, "node2": 4, "node3": 2}
    bad = tmp_path / "bad"
    bad.write_text("node1 4\n")
    with pytest.raises(ConfigError, match="line 1.*hostname slots=N"):
        parse_hostfile(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_hostfile(str(tmp_path / "missing"))


@pytest.mark.parametrize("launcher, expected", [
    ({}, 10),                                            # all slots of all hosts
    ({"num_nodes": 2}, 8),                               # first two hosts
    ({"num_gpus": 2}, 6),                                # 3 hosts x 2
    ({"num_nodes": 2, "num_gpus": 1}, 2),
    ({"include": "node2@node3:0"}, 5),
    ({"include": "node1:0,1,2"}, 3),
    ({"exclude": "node1"}, 6),
    ({"exclude": "node1:0@node3"}, 7),
])
def test_world_size_with_hostfile(hostfile, launcher, expected):
    assert compute_world_size(LauncherArgs(hostfile=hostfile, **launcher)) == expected


@pytest.mark.parametrize("launcher, phrase", [
    ({"include": "node9"}, "not in the resource pool"),
    ({"include": "node3:5"}, "slots \\[5\\] of host 'node3' do not exist"),
    ({"include": "node1", "exclude": "node2"}, "only one of them"),
    ({"num_nodes": 4}, "only 3 host"),
    ({"exclude": "node1", "num_nodes": 1}, "cannot be combined with num_nodes"),
    ({"include": "node1", "num_gpus": 2}, "cannot be combined"),
    ({"exclude": "node1@node2@node3"}, "no hosts or slots are left"),
])
def test_world_size_errors(hostfile, launcher, phrase):
    with pytest.raises(ConfigError, match=phrase):
        compute_world_size(LauncherArgs(hostfile=hostfile, **launcher))


def test_single_node_without_hostfile():
    assert compute_world_size(LauncherArgs(num_gpus=3)) == 3
    assert compute_world_size(LauncherArgs()) == visible_gpu_count() >= 1
    assert compute_world_size(LauncherArgs(include="localhost:0")) == 1
    with pytest.raises(ConfigError, match="needs a hostfile"):
        compute_world_size(LauncherArgs(num_nodes=2, num_gpus=8))
    assert compute_world_size(LauncherArgs(num_nodes=2, num_gpus=8, deepspeed_slurm=True)) == 16


def test_select_resources_keeps_host_order():
    chosen = select_resources({"b": 2, "a": 3}, None, None, num_nodes=1, num_gpus=None)
    assert chosen == {"b": [0, 1]}


def test_from_dict_computes_world_size(hostfile):
    args = NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "data_path": "data/bundled/x", "train_micro_batch_size_per_gpu": 2,
                               "hostfile": hostfile, "num_gpus": 2, "model_parallel_size": 2})
    assert args.derived.world_size == 6 and args.derived.data_parallel_size == 3
    assert args.derived.train_batch_size == 6
