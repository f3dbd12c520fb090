"""The index of every YAML key: normalized key -> (section, field, type annotation).

Keys are normalized by replacing dashes with underscores (`train-iters` is `train_iters`); case matters.
Field names are unique across sections, so a flat key names exactly one field.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, Optional

from megatron.neox_args.sections import SECTIONS


@dataclass(frozen=True)
class FieldSpec:
    """One settable field: its YAML key, the section it lives in and its resolved type annotation."""

    name: str
    section: str
    annotation: Any


def normalize_key(key: str) -> str:
    """`train-iters` -> `train_iters`: dashes and underscores are the same in every key."""
    return key.replace("-", "_")


def _build_index() -> dict[str, FieldSpec]:
    index: dict[str, FieldSpec] = {}
    for section_name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise RuntimeError(
                    f"field {f.name!r} is defined in both section {index[f.name].section!r} and "
                    f"{section_name!r}; YAML keys must be unique across sections"
                )
            index[f.name] = FieldSpec(f.name, section_name, hints[f.name])
    return index


FIELDS: dict[str, FieldSpec] = _build_index()
"""Every settable key (underscore spelling) -> its FieldSpec, in section order."""

NESTED_KEYS = ("optimizer",)
"""Top-level keys that are not fields but nested blocks expanded into fields (see loader.py)."""


def closest_key(key: str, candidates: Optional[typing.Iterable[str]] = None) -> Optional[str]:
    """The valid key most similar to `key` (difflib ratio >= 0.6), or None."""
    pool = list(candidates) if candidates is not None else list(FIELDS) + list(NESTED_KEYS)
    matches = difflib.get_close_matches(normalize_key(key), pool, n=1, cutoff=0.6)
    return matches[0] if matches else None
