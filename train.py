"""Worker entry point: one process per rank, started by deepy.py through the DeepSpeed launcher.

    python deepy.py train.py configs/tiny.yml

A user's mistake found on the workers (a damaged checkpoint, an unreadable tokenizer file) ends the run
with its message and exit code 2, not a stack trace from deep inside.
"""

import os
import sys

from megatron.checkpointing import CheckpointError
from megatron.launcher import parse_worker_args
from megatron.neox_args import ConfigError
from megatron.tokenizer.base import TokenizerFileError
from megatron.training.setup import build_and_train

USER_ERRORS = (CheckpointError, ConfigError, TokenizerFileError)


def main(argv=None) -> int:
    args = parse_worker_args(argv)
    try:
        build_and_train(args)
    except USER_ERRORS as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
