"""A stand-in for train.py, started by deepy.py in tests: decode the config, join a gloo group of
WORLD_SIZE ranks, all-reduce (rank + 1), and write what this rank saw to `<log_dir>/echo_rank<R>.json`."""

import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.launcher import parse_worker_args  # noqa: E402


def main() -> None:
    args = parse_worker_args(sys.argv[1:])
    dist.init_process_group(backend="gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher
    rank = dist.get_rank()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "sum": value.item(),
        "config_world_size": args.derived.world_size,
        "train_iters": args.training.train_iters,
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
    }
    with open(os.path.join(args.logging.log_dir, f"echo_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
