"""Reading YAML files and flattening them into one `{field: Setting}` map, strictly.

Rules (each violation is a ConfigError naming the file(s) and the key):
- Keys are flat and name one section field each; `train-iters` and `train_iters` are the same key.
- A key may be set once across all files and spellings (as GPT-NeoX's from_ymls, but spelling-blind);
  the same key twice inside one YAML mapping is an error too (PyYAML would silently keep the last).
- `optimizer: {type: T, params: {lr, betas, eps, momentum, weight_decay}}` expands to the fields
  optimizer_type, lr, betas, eps, momentum, weight_decay; those may also be written flat, but not both.
- An unknown key names the closest valid key (difflib).
- Numbers in exponent notation without a dot (`1e-5`, `3e-4`) or with an unsigned exponent (`6.0e4`)
  are floats: YAML 1.1 (PyYAML) would read them as strings; a resolver here fixes that.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from megatron.neox_args.errors import ConfigError
from megatron.neox_args.registry import FIELDS, closest_key, normalize_key
from megatron.neox_args.sections import DerivedArgs
from megatron.neox_args.upstream import classify, translate_renames


@dataclass(frozen=True)
class Setting:
    """A value the user wrote: the value, the file (or "<dict>") and the key as spelled there."""

    value: Any
    source: str
    spelling: str


OPTIMIZER_BLOCK_KEYS = {"type": "optimizer_type", "params": None}
"""Keys allowed directly under `optimizer:`; `type` is the field optimizer_type, `params` a nested block."""

OPTIMIZER_PARAM_KEYS = ("lr", "betas", "eps", "momentum", "weight_decay")
"""Keys allowed under `optimizer.params:`; each is the field of the same name."""

_RENAMED_OR_DERIVED_HINTS = {
    "scheduler": "the learning-rate schedule is set by lr_decay_style, lr_decay_iters, warmup and min_lr",
    "derived": "the derived block is computed, never written; read a serialized config with "
    "NeoXArgs.from_serialized",
}
"""Keys users plausibly write (often from GPT-NeoX) that are not fields here, with what to write instead."""


# --- YAML ------------------------------------------------------------------------------------------------

_FLOAT_PATTERN = re.compile(
    r"""^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$""", re.X
)
"""Exponent-notation floats PyYAML misses: `1e-5`, `3E4`, `6.0e4`, `.5e-3` (YAML 1.1 wants a dot and a
signed exponent)."""


class _DuplicateYamlKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _ConfigYamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float and refuses a key repeated within one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in seen:
                    raise _DuplicateYamlKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Copy the class-level resolver table before adding to it, so yaml.SafeLoader itself is untouched.
_ConfigYamlLoader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> dict:
    """Parse one YAML document into a dict (empty document -> {}); errors name `source`."""
    try:
        data = yaml.load(text, Loader=_ConfigYamlLoader)
    except _DuplicateYamlKey as dup:
        raise ConfigError(
            f"`{dup.key}` appears twice in {source} (line {dup.line}); each key may be set only once. "
            f"Remove one of them.",
            key=normalize_key(str(dup.key)), sources=[source],
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}", sources=[source]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source} must hold a mapping of `key: value` lines at the top level, "
            f"but it holds a {type(data).__name__}.",
            sources=[source],
        )
    return data


def read_yaml_file(path: str | Path) -> dict:
    """Read and parse one config file; a missing file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.", sources=[str(path)])
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


# --- flattening ------------------------------------------------------------------------------------------

def _unknown_key_error(spelling: str, source: str, candidates: Iterable[str] | None = None,
                       context: str = "") -> ConfigError:
    key = normalize_key(spelling)
    hint = _RENAMED_OR_DERIVED_HINTS.get(key)
    derived_names = {f.name for f in dataclasses.fields(DerivedArgs)}
    if hint is None and candidates is None and key in derived_names:
        hint = f"`{key}` is computed from other keys (DerivedArgs), never set directly"
    if hint is None:
        match = closest_key(key, candidates)
        hint = f"did you mean `{match}`?" if match else "no similar key exists"
    where_text = f"{context} in {source}" if context else f"in {source}"
    return ConfigError(
        f"unknown key `{spelling}` {where_text}: {hint} (every valid key is listed in docs/CONFIG.md).",
        key=key, sources=[source],
    )


def _expand_optimizer_block(block: Any, source: str) -> list[tuple[str, str, Any]]:
    """`optimizer: {type, params: {...}}` -> [(field, spelling, value)]."""
    if not isinstance(block, Mapping):
        raise ConfigError(
            f"`optimizer` in {source} must be a mapping like `optimizer: {{type: AdamW, params: {{lr: 6.0e-4}}}}`, "
            f"got {block!r}; or write the flat keys optimizer_type, lr, betas, eps, momentum.",
            key="optimizer", sources=[source],
        )
    items: list[tuple[str, str, Any]] = []
    for raw_key, value in block.items():
        key = normalize_key(str(raw_key))
        if key not in OPTIMIZER_BLOCK_KEYS:
            raise _unknown_key_error(str(raw_key), source, OPTIMIZER_BLOCK_KEYS, context="inside `optimizer`")
        if key == "type":  # GPT-NeoX compares the type case-insensitively (`adam`, `Adam`)
            canonical = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}
            value = canonical.get(value.lower(), value) if isinstance(value, str) else value
            items.append(("optimizer_type", f"optimizer.{raw_key}", value))
            continue
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"`optimizer.params` in {source} must be a mapping like `{{lr: 6.0e-4, betas: [0.9, 0.95]}}`, "
                f"got {value!r}.",
                key="optimizer", sources=[source],
            )
        for raw_param, param_value in value.items():
            param = normalize_key(str(raw_param))
            if param not in OPTIMIZER_PARAM_KEYS:
                raise _unknown_key_error(str(raw_param), source, OPTIMIZER_PARAM_KEYS,
                                         context="inside `optimizer.params`")
            items.append((param, f"optimizer.{raw_key}.{raw_param}", param_value))
    return items


class SettingsMap(dict):
    """`{field: Setting}` plus what the GPT-NeoX key table did: `noops` ({key: (source, why)}) for accepted
    keys without effect here, `notes` (one line per translated upstream key)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noops: dict[str, tuple[str, str]] = {}
        self.notes: list[str] = []
        self.world_size: int | None = None  # GPT-NeoX's global_num_gpus with a hostfile
        self.world_size_source: str | None = None


def flatten_mapping(data: Mapping, source: str, problems: list | None = None,
                    upstream: dict | None = None) -> list[tuple[str, str, Any]]:
    """One file's top-level mapping -> [(field name, key as spelled, value)].

    GPT-NeoX keys that are not fields (upstream.py) go to `upstream` ({key: (value, spelling, kind, why)});
    every refused or unknown key is appended to `problems` as (key, message). Without `problems` the first
    one is raised.
    """
    collect = problems if problems is not None else []
    items: list[tuple[str, str, Any]] = []
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"key {raw_key!r} in {source} is not a string; keys are names like `hidden_size`.",
                              sources=[source])
        key = normalize_key(raw_key)
        if key == "optimizer":
            items.extend(_expand_optimizer_block(value, source))
        elif key in FIELDS:
            items.append((key, raw_key, value))
        else:
            kind, why = classify(key, value)
            if kind in ("noop", "rename") and upstream is not None:
                upstream[key] = (value, raw_key, kind, why)
            elif kind == "refuse":
                collect.append((key, f"{why} ({source})"))
            else:
                collect.append((key, str(_unknown_key_error(raw_key, source))))
        if problems is None and collect:
            raise ConfigError(collect[0][1], key=collect[0][0], sources=[source])
    return items


def _refuse_all(problems: list[tuple[str, str]], sources: list[str]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(problems[0][1], key=problems[0][0], sources=sources)
    lines = "\n".join(f"  - {message}" for _, message in problems)
    return ConfigError(f"{len(problems)} keys cannot be used as written (every one is listed; keys of GPT-NeoX "
                       f"that only tune its kernels or logging are accepted, see docs/CONFIG.md):\n{lines}",
                       key=problems[0][0], sources=sources)


def merge_settings(documents: Iterable[tuple[Mapping, str]]) -> SettingsMap:
    """Merge `(mapping, source)` pairs left to right into `{field: Setting}`; a repeated field is an error.

    Every unknown or refused key of every file is reported in one ConfigError. GPT-NeoX renames
    (`precision`, `fp32_allreduce`, ...) are applied after the merge (upstream.translate_renames).
    """
    merged = SettingsMap()
    problems: list[tuple[str, str]] = []
    raw_upstream: dict[str, tuple[Any, str, str]] = {}
    seen_sources: list[str] = []
    for data, source in documents:
        seen_sources.append(source)
        upstream: dict = {}
        for key, spelling, value in flatten_mapping(data, source, problems, upstream):
            if key in merged:
                first = merged[key]
                raise ConfigError(
                    f"`{key}` is set twice: as `{first.spelling}` in {first.source} and as `{spelling}` in "
                    f"{source}. Each key may be set only once across all config files (dashes and "
                    f"underscores are the same key); remove one of them.",
                    key=key, sources=[first.source, source],
                )
            merged[key] = Setting(value, source, spelling)
        for key, (value, spelling, kind, why) in upstream.items():
            previous = raw_upstream.get(key) or (merged.noops.get(key) and (None, merged.noops[key][0], key))
            if previous:
                raise ConfigError(f"`{key}` is set twice: in {previous[1]} and in {source}. Each key may be set "
                                  f"only once across all config files; remove one of them.",
                                  key=key, sources=[previous[1], source])
            if kind == "noop":
                merged.noops[key] = (source, why)
            else:
                raw_upstream[key] = (value, source, spelling)
    if problems:
        raise _refuse_all(problems, seen_sources)

    def get(field_name: str):
        setting = merged.get(field_name)
        return None if setting is None else (setting.value, setting.source, setting.spelling)

    translated, notes, refusals = translate_renames(raw_upstream, get)
    if refusals:
        raise _refuse_all([(r.split(" ", 1)[0], r) for r in refusals], seen_sources)
    world = translated.pop("__world_size__", None)
    merged.world_size, merged.world_size_source = (None, None) if world is None else world[:2]
    for field_name, (value, source, spelling) in translated.items():
        merged[field_name] = Setting(value, source, spelling)
    merged.notes = notes
    return merged
