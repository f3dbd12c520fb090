"""Worker entry point: one process per rank, started by deepy.py through the DeepSpeed launcher.

    python deepy.py train.py configs/tiny.yml

A user's mistake found on the workers (a damaged checkpoint, an unreadable tokenizer file) ends the run
with its message and exit code 2, not a stack trace from deep inside; a run stopped by SIGTERM/SIGINT
(after saving) exits with 3.
"""

import os
import sys

from megatron.checkpointing import CheckpointError
from megatron.data.integrity import DataFileError
from megatron.launcher import parse_worker_args
from megatron.neox_args import ConfigError
from megatron.tokenizer.base import TokenizerFileError
from megatron.training.divergence import DivergenceError
from megatron.training.setup import build_and_train

USER_ERRORS = (CheckpointError, ConfigError, TokenizerFileError, DivergenceError, DataFileError)
PREEMPTED_EXIT = 3
"""Exit status of a run stopped by SIGTERM/SIGINT after saving (it did not reach train_iters)."""


def main(argv=None) -> int:
    args = parse_worker_args(argv)
    try:
        final = build_and_train(args)
    except USER_ERRORS as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    except ModuleNotFoundError as err:  # an optional package the config needs (wandb, tensorboard, ...)
        if (err.name or "megatron").split(".")[0] == "megatron":
            raise  # our own bug: keep the traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: error: this config needs the Python package {err.name!r}, which is not installed "
                  f"here: pip install {err.name} (or the extras in requirements/), or turn off the key that "
                  f"uses it.", file=sys.stderr, flush=True)
        return 2
    return PREEMPTED_EXIT if final.get("stopped_by") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
