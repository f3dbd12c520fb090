"""Checks of the data and tokenizer sections, including that the named files exist.

Data: exactly one of data_path (split by `split`) or train_data_paths (blended, with optional
valid/test paths); weight lists have the length of their path lists. A data prefix `p` needs `p.bin`
and `p.idx`, except prefixes under `data/bundled/`, which are built on first use.
Tokenizer: HFTokenizer needs vocab_file (tokenizer.json); GPT2BPETokenizer needs vocab_file and
merge_file; ByteLevelTokenizer needs (and takes) no files.
File checks are skipped with `check_files=False` (a config read back from a checkpoint on another
machine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from megatron.neox_args.validate import fail

BUNDLED_DATA_PREFIX = "data/bundled/"
"""Data prefixes starting with this are built on first use (megatron.data.bundled), not checked here."""


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> [969.0, 30.0, 1.0]; raises ValueError unless 3 non-negative numbers summing > 0."""
    parts = [p.strip() for p in split.split(",")]
    if len(parts) != 3:
        raise ValueError("needs 3 numbers")
    values = [float(p) for p in parts]
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError("needs non-negative numbers summing to more than 0")
    return values


def _check_prefix_files(key: str, prefix: str, sources: Mapping[str, str]) -> None:
    if os.path.normpath(prefix).startswith(BUNDLED_DATA_PREFIX):
        return
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise fail(sources, f"{key}: data file {prefix + suffix} does not exist {{where}}. A data prefix names "
                                f"a .bin/.idx pair made by tools/datasets/preprocess_data.py; fix the path, or "
                                f"use {BUNDLED_DATA_PREFIX}pystdlib_text_document (built on first use).", key)


def _check_path_list(paths_key: str, paths: Optional[list], weights_key: str, weights: Optional[list],
                     sources: Mapping[str, str], check_files: bool) -> None:
    if paths is None:
        if weights is not None:
            raise fail(sources, f"{weights_key} is set but {paths_key} is not {{where}}; weights blend the "
                                f"prefixes of {paths_key}. Set {paths_key} or remove {weights_key}.",
                       weights_key, paths_key)
        return
    if not paths or not all(isinstance(p, str) for p in paths):
        raise fail(sources, f"{paths_key}: {paths!r} must be a non-empty list of data prefixes (strings) "
                            f"{{where}}.", paths_key)
    if weights is not None:
        if len(weights) != len(paths):
            raise fail(sources, f"{weights_key} has {len(weights)} entries but {paths_key} has {len(paths)} "
                                f"{{where}}; give one weight per path.", weights_key, paths_key)
        if (any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights)
                or sum(weights) <= 0):
            raise fail(sources, f"{weights_key}: {weights!r} must be non-negative numbers summing to more than "
                                f"0 {{where}}.", weights_key)
    if check_files:
        for prefix in paths:
            _check_prefix_files(paths_key, prefix, sources)


def validate_data(data: Any, sources: Mapping[str, str], check_files: bool = True) -> None:
    """Check the data section (see module docstring)."""
    try:
        parse_split(data.split)
    except ValueError:
        raise fail(sources, f"split: {data.split!r} must be 3 comma-separated non-negative numbers with a "
                            f"positive sum (train,valid,test proportions) {{where}}, e.g. '969,30,1'.",
                   "split") from None
    if data.data_path is not None and data.train_data_paths is not None:
        raise fail(sources, f"data_path: {data.data_path!r} and train_data_paths: {data.train_data_paths!r} are "
                            f"both set {{where}}; choose one: data_path (one dataset split by `split`) or "
                            f"train_data_paths (+ valid_data_paths, test_data_paths).",
                   "data_path", "train_data_paths")
    if data.data_path is None and data.train_data_paths is None:
        raise fail(sources, "no training data: neither data_path nor train_data_paths is set {where}. Set "
                            f"data_path: {BUNDLED_DATA_PREFIX}pystdlib_text_document (bundled), or your own "
                            "preprocessed prefix.", "data_path", "train_data_paths")
    if data.data_path is not None:
        for other in ("valid_data_paths", "test_data_paths"):
            if getattr(data, other) is not None:
                raise fail(sources, f"{other} is set together with data_path {{where}}; data_path is split into "
                                    f"train/valid/test by `split`. Use train_data_paths with {other}, or drop "
                                    f"{other}.", other, "data_path")
        if check_files:
            _check_prefix_files("data_path", data.data_path, sources)
    for part in ("train", "valid", "test"):
        _check_path_list(f"{part}_data_paths", getattr(data, f"{part}_data_paths"),
                         f"{part}_data_weights", getattr(data, f"{part}_data_weights"), sources, check_files)


_TOKENIZER_FILES = {
    "HFTokenizer": "a tokenizer.json", "GPT2BPETokenizer": "a vocab.json",
    "HFGPT2Tokenizer": "a directory holding GPT-2's vocab.json and merges.txt, or the vocab.json",
    "SPMTokenizer": "a SentencePiece .model file",
    "TiktokenTokenizer": "a tiktoken encoding name such as cl100k_base, or a .tiktoken file",
}


def validate_tokenizer(tokenizer: Any, sources: Mapping[str, str], check_files: bool = True) -> None:
    """Check the tokenizer section (see module docstring)."""
    kind = tokenizer.tokenizer_type
    needed = {"HFTokenizer": ("vocab_file",), "GPT2BPETokenizer": ("vocab_file", "merge_file"),
              "HFGPT2Tokenizer": ("vocab_file",), "SPMTokenizer": ("vocab_file",), "TiktokenTokenizer": ("vocab_file",),
              "CharLevelTokenizer": (), "ByteLevelTokenizer": ()}[kind]
    for key in ("vocab_file", "merge_file"):
        value = getattr(tokenizer, key)
        if key in needed and value is None:
            what = _TOKENIZER_FILES[kind] if key == "vocab_file" else "a merges.txt"
            default = " (GPT-NeoX's default tokenizer)" if "tokenizer_type" not in sources else ""
            raise fail(sources, f"tokenizer_type: {kind}{default} needs {key} ({what}) {{where}}; set {key}, or "
                                f"use tokenizer_type: ByteLevelTokenizer, which needs no files.", key,
                       "tokenizer_type")
        if key not in needed and value is not None:
            raise fail(sources, f"{key}: {value!r} is set but tokenizer_type {kind} does not use it {{where}}; "
                                f"remove {key} or change tokenizer_type.", key, "tokenizer_type")
    for key in needed if check_files else ():
        value = getattr(tokenizer, key)
        if kind == "TiktokenTokenizer" and not value.endswith(".tiktoken") and os.sep not in value:
            continue  # an encoding name (cl100k_base), read from tiktoken's cache when the tokenizer is built
        if kind == "HFGPT2Tokenizer" and Path(value).is_dir():
            continue
        if not Path(value).is_file():
            raise fail(sources, f"{key}: tokenizer file {value} does not exist {{where}}; fix the path.", key)
