"""ConfigError: the one exception type for every mistake in the user's configuration.

Its message is one self-contained paragraph: which key, which value, which file set it, and what to write
instead. `str(error)` is all a user needs to see; no stack trace is required to understand it.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

DEFAULT_SOURCE = "default"
"""The source recorded for a field the user did not set."""


class ConfigError(ValueError):
    """A user-input error in the configuration.

    Attributes:
        key: the (normalized) key the error is about, when there is one.
        sources: the files (or "<dict>", "default") the involved values came from.
    """

    def __init__(self, message: str, key: Optional[str] = None, sources: Iterable[str] = ()):
        # One paragraph: collapse any accidental newlines/indentation into single spaces.
        super().__init__(" ".join(message.split()))
        self.key = key
        self.sources = tuple(sources)


def format_error(error: BaseException) -> str:
    """Render an error for the console: `Config error: <message>` for a ConfigError, else `Type: message`."""
    if isinstance(error, ConfigError):
        return f"Config error: {error}"
    return f"{type(error).__name__}: {error}"


def where(sources: Mapping[str, str], *keys: str) -> str:
    """Where the given keys' values came from: `(configs/a.yml)` when all share one source, else grouped
    by source, e.g. `(hidden_size from a.yml; num_attention_heads from default)`."""
    by_source: dict[str, list[str]] = {}
    for key in keys:
        by_source.setdefault(sources.get(key, DEFAULT_SOURCE), []).append(key)
    if len(by_source) == 1:
        return f"({next(iter(by_source))})"
    return "(" + "; ".join(f"{', '.join(names)} from {source}" for source, names in by_source.items()) + ")"
