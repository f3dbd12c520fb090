"""Worker entry point: one process per rank, started by deepy.py through the DeepSpeed launcher.

    python deepy.py train.py configs/tiny.yml
"""

import sys

from megatron.launcher import parse_worker_args
from megatron.training.setup import build_and_train


def main(argv=None) -> None:
    args = parse_worker_args(argv)
    build_and_train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
