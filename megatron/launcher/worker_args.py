"""How the resolved config travels from deepy.py to every train.py process.

deepy.py writes it into the run directory (`<run_dir>/neox_args.json`, the same file the user reads) and
starts the workers with `--neox_args_file <that path>`: a short command line, so that a failing worker's
launcher does not print kilobytes of config, and the config is a file one can open. Multi-node runs
need the run directory (`log_dir`) on a filesystem every node sees, as they do for checkpoints.
`--neox_args <base64 JSON>` (URL-safe alphabet: one shell-safe token) is still accepted, for scripts that
start workers themselves.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from typing import Optional, Sequence

WORKER_ARG = "--neox_args"
WORKER_FILE_ARG = "--neox_args_file"


def encode_neox_args(args) -> str:
    """`args.serialize()` (JSON) as URL-safe base64 text."""
    return base64.urlsafe_b64encode(args.serialize().encode("utf-8")).decode("ascii")


def decode_neox_args(encoded: str):
    """Inverse of `encode_neox_args`: the NeoXArgs deepy.py resolved."""
    from megatron.neox_args import ConfigError, NeoXArgs

    try:
        text = base64.b64decode(encoded.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError) as err:
        raise ConfigError(f"{WORKER_ARG} is not base64 text written by deepy.py ({err}); start workers "
                          f"with `python deepy.py train.py <configs>`.") from None
    return NeoXArgs.from_serialized(text)


def read_neox_args_file(path: str):
    """The NeoXArgs in the JSON file deepy.py wrote (`run_dir.write_resolved_json`)."""
    from megatron.neox_args import ConfigError, NeoXArgs

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ConfigError(f"{WORKER_FILE_ARG} {path}: cannot read the resolved config ({err.strerror}); deepy.py "
                          f"writes it into the run directory (log_dir), which every node must see.") from None
    return NeoXArgs.from_serialized(text)


def parse_worker_args(argv: Optional[Sequence[str]] = None):
    """Read the config from `--neox_args_file <path>` (or decode `--neox_args <base64>`) on a worker's command
    line (default `sys.argv[1:]`) -> NeoXArgs.

    `--local_rank=N` (or `--local_rank N`), which the DeepSpeed launcher appends, is accepted and ignored:
    the local rank is read from the LOCAL_RANK environment variable like every other rank variable.
    """
    parser = argparse.ArgumentParser(
        description="Worker entry point; started by deepy.py, which passes the resolved config.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(WORKER_FILE_ARG, help="the resolved config's JSON file (deepy.py writes it)")
    source.add_argument(WORKER_ARG, help="base64 of NeoXArgs.serialize()")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher; unused")
    options = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if options.neox_args_file is not None:
        return read_neox_args_file(options.neox_args_file)
    return decode_neox_args(options.neox_args)
