"""What every tokenizer offers, and the error raised for unusable tokenizer files."""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


class TokenizerFileError(ValueError):
    """A tokenizer file named in the config is missing or cannot be parsed.

    The message names the config key (`vocab_file` / `merge_file`), the path, and what to do.
    """


@runtime_checkable
class Tokenizer(Protocol):
    """The interface the rest of the trainer relies on.

    - `name`: the tokenizer type, as written in the config (`tokenizer_type`).
    - `vocab_size`: number of ids the tokenizer can emit (before any padding for the model).
    - `eod`: the end-of-document id appended between documents by preprocessing.
    - `tokenize(text) -> list[int]` and `detokenize(ids) -> str`; `detokenize(tokenize(t)) == t` for any
      text `t` that does not contain special tokens.
    """

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids) -> str: ...


def require_file(path: str | None, key: str, tokenizer_type: str, what: str) -> str:
    """Return `path` if it names an existing file, else raise TokenizerFileError naming `key`."""
    if path is None:
        raise TokenizerFileError(
            f"tokenizer_type {tokenizer_type} needs `{key}` ({what}), but it is not set. "
            f"Write `{key}: /path/to/file` in your config (or pass --{key.replace('_', '-')})."
        )
    if not os.path.isfile(path):
        raise TokenizerFileError(
            f"`{key}` for tokenizer_type {tokenizer_type} points to {path!r}, which does not exist "
            f"(or is not a file). Expected {what}."
        )
    return path
