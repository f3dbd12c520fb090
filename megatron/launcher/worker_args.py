"""How the resolved config travels from deepy.py to every train.py process: `--neox_args <base64 JSON>`.

Base64 (URL-safe alphabet) keeps the JSON one shell-safe token through every launcher (pdsh and srun
re-split arguments on spaces and quotes; base64 has neither).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from typing import Optional, Sequence

WORKER_ARG = "--neox_args"


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


def parse_worker_args(argv: Optional[Sequence[str]] = None):
    """Decode `--neox_args <base64>` from a worker's command line (default `sys.argv[1:]`) -> NeoXArgs.

    `--local_rank=N` (or `--local_rank N`), which the DeepSpeed launcher appends, is accepted and ignored:
    the local rank is read from the LOCAL_RANK environment variable like every other rank variable.
    """
    parser = argparse.ArgumentParser(
        description="Worker entry point; started by deepy.py, which passes the resolved config.",
    )
    parser.add_argument(WORKER_ARG, required=True, help="base64 of NeoXArgs.serialize() (deepy.py writes it)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher; unused")
    options = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return decode_neox_args(options.neox_args)
