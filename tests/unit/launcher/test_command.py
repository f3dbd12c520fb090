"""The launch commands deepy.py builds, checked as argv lists (multi-node launchers cannot run here)."""

from types import SimpleNamespace

import pytest

from megatron.launcher.command import LaunchError, plan_launch, runner_command
from megatron.launcher.slurm import first_host, slurm_worker_env
from megatron.neox_args import ConfigError
from megatron.neox_args.sections import LauncherArgs

PY = "/usr/bin/python3"
RUNNER = [PY, "-u", "-m", "deepspeed.launcher.runner"]
TAIL = ["--log_level", "warning", "train.py", "--neox_args_file", "CFG"]


def command(cuda_available=True, **launcher_fields):
    return runner_command(LauncherArgs(**launcher_fields), "train.py", "CFG", cuda_available=cuda_available,
                          python=PY)


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nworker-0 slots=8\nworker-1 slots=8\n")
    return str(path)


def test_single_node_two_gpus():
    assert command(num_gpus=2) == RUNNER + ["--num_gpus", "2", "--master_port", "29500"] + TAIL


def test_single_node_all_visible_gpus_leaves_the_count_to_deepspeed():
    # no --num_gpus: the runner then honours CUDA_VISIBLE_DEVICES
    assert command(num_gpus=None) == RUNNER + ["--master_port", "29500"] + TAIL


def test_cpu_ranks_are_always_explicit():
    assert command(cuda_available=False, num_gpus=2) == RUNNER + ["--num_gpus", "2", "--master_port", "29500"] + TAIL
    assert command(cuda_available=False) == RUNNER + ["--num_gpus", "1", "--master_port", "29500"] + TAIL


def test_hostfile_include_pdsh(hostfile):
    argv = command(hostfile=hostfile, include="worker-0:0,1@worker-1", master_addr="10.0.0.1", master_port=6000)
    assert argv == RUNNER + ["--hostfile", hostfile, "--launcher", "pdsh", "--include", "worker-0:0,1@worker-1",
                             "--master_port", "6000", "--master_addr", "10.0.0.1"] + TAIL


def test_hostfile_exclude_slurm_with_num_nodes_rejected(hostfile):
    argv = command(hostfile=hostfile, exclude="worker-1:7", launcher="slurm")
    assert argv[4:10] == ["--hostfile", hostfile, "--launcher", "slurm", "--exclude", "worker-1:7"]
    with pytest.raises(LaunchError, match="cannot be combined with num_gpus/num_nodes"):
        command(hostfile=hostfile, exclude="worker-1:7", launcher="slurm", num_nodes=1)


def test_hostfile_num_nodes_and_gpus_pdsh(hostfile):
    argv = command(hostfile=hostfile, num_nodes=1, num_gpus=4)
    assert argv == RUNNER + ["--hostfile", hostfile, "--launcher", "pdsh", "--num_nodes", "1", "--num_gpus", "4",
                             "--master_port", "29500"] + TAIL


def test_openmpi_uses_every_hostfile_slot(hostfile):
    argv = command(hostfile=hostfile, launcher="openmpi", num_gpus=8, master_addr="worker-0")
    assert argv == RUNNER + ["--hostfile", hostfile, "--launcher", "openmpi", "--master_port", "29500",
                             "--master_addr", "worker-0"] + TAIL


def test_openmpi_refuses_include_and_disagreeing_counts(hostfile):
    with pytest.raises(LaunchError, match="openmpi cannot select hosts"):
        command(hostfile=hostfile, launcher="openmpi", include="worker-0")
    with pytest.raises(LaunchError, match="num_gpus is 4"):
        command(hostfile=hostfile, launcher="mvapich", num_gpus=4)
    with pytest.raises(LaunchError, match="num_nodes is 1"):
        command(hostfile=hostfile, launcher="openmpi", num_nodes=1)


def test_multi_node_launcher_without_hostfile_is_an_error():
    with pytest.raises(LaunchError, match="needs a hostfile"):
        command(launcher="slurm", num_nodes=2)
    assert issubclass(LaunchError, ConfigError)


def test_plan_sets_cpu_accelerator_only_without_gpu():
    args = SimpleNamespace(launcher=LauncherArgs(num_gpus=2))
    cpu = plan_launch(args, "train.py", "CFG", cuda_available=False, environ={}, python=PY)
    assert cpu.env == {"DS_ACCELERATOR": "cpu"} and not cpu.exec_in_place
    assert cpu.display() == (f"DS_ACCELERATOR=cpu {PY} -u -m deepspeed.launcher.runner --num_gpus 2 "
                             "--master_port 29500 --log_level warning train.py --neox_args_file CFG")
    assert plan_launch(args, "train.py", "CFG", cuda_available=True, environ={}, python=PY).env == {}
    assert plan_launch(args, "train.py", "CFG", cuda_available=False, environ={"DS_ACCELERATOR": "xpu"},
                       python=PY).env == {}


SLURM_ENV = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
             "SLURM_JOB_NODELIST": "gpu[03-04]"}


def test_deepspeed_slurm_execs_the_worker_with_rank_variables():
    args = SimpleNamespace(launcher=LauncherArgs(deepspeed_slurm=True, master_port=6001))
    plan = plan_launch(args, "train.py", "CFG", cuda_available=True, environ=SLURM_ENV, python=PY)
    assert plan.exec_in_place
    assert plan.argv == [PY, "-u", "train.py", "--neox_args_file", "CFG"]
    assert plan.env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8",
                        "MASTER_ADDR": "gpu03", "MASTER_PORT": "6001"}


def test_deepspeed_slurm_outside_srun_and_master_addr_override():
    with pytest.raises(ConfigError, match="started by srun"):
        slurm_worker_env(LauncherArgs(deepspeed_slurm=True), {"SLURM_NTASKS": "2"})
    env = slurm_worker_env(LauncherArgs(deepspeed_slurm=True, master_addr="10.1.1.1"),
                           {k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_NODELIST"})
    assert env["MASTER_ADDR"] == "10.1.1.1"
    with pytest.raises(ConfigError, match="set master_addr"):
        slurm_worker_env(LauncherArgs(deepspeed_slurm=True),
                         {k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_NODELIST"})


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("node1,node2", "node1"), ("gpu[03-05,9],cpu1", "gpu03"), ("gpu[7,9]", "gpu7"),
     ("r[1-2]-n[4,6]", "r1-n4")],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host
