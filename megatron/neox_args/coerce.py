"""Type checking of user values against the field annotations of sections.py.

Supported annotations: int, float, bool, str, list, tuple, dict, Literal[...], Optional[X].
Rules: a bool is never an int or a float; an int is fine for a float field (converted); a float with an
integral value is fine for an int field (`train_iters: 1e5`); a string is never a number (the YAML
loader already reads `1e-5` as a float); a list is fine for a tuple field and vice versa (JSON has no
tuples). Anything else is a ConfigError naming the key, the value, the source and what to write.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from megatron.neox_args.errors import ConfigError

_NoneType = type(None)


def describe_type(annotation: Any) -> str:
    """Human form of an annotation: `an integer`, `one of 'a', 'b'`, `a float or null`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        parts = [describe_type(arg) for arg in typing.get_args(annotation) if arg is not _NoneType]
        return " or ".join(parts) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
    }.get(annotation, str(annotation))


def _example(annotation: Any) -> str:
    return {int: "e.g. 8", float: "e.g. 3.0e-4", bool: "true or false", str: "a quoted string",
            list: "e.g. [a, b]", tuple: "e.g. [0.9, 0.95]", dict: "e.g. {enabled: true}"}.get(annotation, "")


def _wrong(key: str, value: Any, source: str, annotation: Any, note: str = "", shown: Any = None) -> ConfigError:
    """The error for `value` not matching `annotation`; `shown` is the full annotation (e.g. Optional[list])."""
    shown = annotation if shown is None else shown
    example = _example(annotation)
    fix = f"write {describe_type(shown)}" + (f" ({example})" if example else "")
    return ConfigError(f"{key}: {value!r} is not {describe_type(shown)} ({source}); {fix}.{note}",
                       key=key, sources=[source])


def coerce_value(key: str, value: Any, annotation: Any, source: str, shown: Any = None) -> Any:
    """Check `value` against `annotation` and return it in canonical form (float for float fields,
    tuple for tuple fields, int for integral floats in int fields). Raises ConfigError otherwise.
    `shown` (internal) is the annotation to describe in messages, e.g. Optional[int] for its int part."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = typing.get_args(annotation)
        if value is None and _NoneType in args:
            return None
        inner = [arg for arg in args if arg is not _NoneType]
        if len(inner) != 1:
            raise TypeError(f"unsupported annotation for {key}: {annotation}")
        return coerce_value(key, value, inner[0], source, shown=annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, str) and value in choices:
            return value
        match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {match[0]!r}?" if match else ""
        raise ConfigError(
            f"{key}: {value!r} is not {describe_type(shown or annotation)} ({source}).{hint}",
            key=key, sources=[source],
        )
    if value is None:
        return _raise_none(key, annotation, source)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(key, value, source, bool, shown=shown)
    if annotation is int:
        if isinstance(value, bool):
            raise _wrong(key, value, source, int, shown=shown)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _wrong(key, value, source, int, shown=shown)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            note = " Do not quote numbers." if isinstance(value, str) else ""
            raise _wrong(key, value, source, float, note, shown)
        return float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _wrong(key, value, source, str, shown=shown)
    if annotation in (list, tuple):
        if isinstance(value, (list, tuple)):
            return annotation(value)
        raise _wrong(key, value, source, annotation, shown=shown)
    if annotation is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _wrong(key, value, source, dict, shown=shown)
    raise TypeError(f"unsupported annotation for {key}: {annotation}")


def _raise_none(key: str, annotation: Any, source: str):
    raise ConfigError(
        f"{key}: null is not allowed ({source}); write {describe_type(annotation)} or remove the key to "
        f"use the default.",
        key=key, sources=[source],
    )
