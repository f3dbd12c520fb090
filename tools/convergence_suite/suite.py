"""A convergence suite: what to train, which runs must agree, and how closely.

A suite file (configs/convergence/*.yml) is YAML with these keys:

    configs: [configs/tiny.yml]      # config files, merged left to right (a key in two files is an error)
    set:                             # keys on top of them for every run; a dotted key sets one entry of a
      train_iters: 24                #   block (zero_optimization.stage: 1), a mapping replaces the block
    tolerance:                       # the band a variant must stay in, at every common logged step
      train_loss: 5.0e-5             #   max |variant - reference| of the train loss
      valid_loss: 5.0e-5             #   ... of the validation loss (default: train_loss)
      window: 1                      #   compare moving averages over this many logged points (default 1)
    references:                      # runs the variants are compared with; the first is the default
      - name: ref
      - name: ref_tied
        set: {no_weight_tying: false}
    variants:
      - name: zero1
        set: {zero_optimization.stage: 1, num_gpus: 2, train_micro_batch_size_per_gpu: 2}
      - name: resume                 # train to step 12, stop, resume from the checkpoint, join the curves
        resume_at: 12
      - name: pp2_tied
        reference: ref_tied          # compared with this reference instead of the first
        tolerance: {train_loss: 1.0e-4}   # per-variant override of any tolerance key

The command line adds `--set key=value` (every run, after the suite's `set`) and `--variant "name:
key=value ..."` (tools/bench's syntax; the harness keys `resume_at=K` and `reference=NAME` may appear
among the config keys), and selects with `--only` / `--skip` (variant names; a reference that no selected
variant uses is not run). Per run, lowest precedence first: configs, suite `set`, `--set`, the run's own
`set`; the harness then owns `log_dir`, `master_port`, `save`, `load` and `finetune` (no checkpoints,
except the resume variant's own).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

SUITE_KEYS = {"name", "configs", "set", "tolerance", "references", "variants"}
RUN_KEYS = {"name", "set", "reference", "resume_at", "tolerance"}
TOLERANCE_KEYS = {"train_loss", "valid_loss", "window"}
HARNESS_KEYS = ("resume_at", "reference")  # keys of --variant that are not config keys
OWNED_KEYS = ("log_dir", "master_port", "save", "load", "finetune")
NAME_PATTERN = r"[A-Za-z0-9_.-]+"


class SuiteError(ValueError):
    """A usage or suite-file error (tools/convergence.py exits 2 with the message)."""


@dataclass(frozen=True)
class Tolerance:
    """The band around the reference: |variant - reference| <= train_loss (valid_loss) at every common
    logged step, after a moving average over `window` logged points (1: the raw values)."""

    train_loss: float
    valid_loss: float
    window: int = 1


@dataclass
class Run:
    """One training run of the suite: a reference (`reference` None) or a variant compared with one."""

    name: str
    overrides: dict = field(default_factory=dict)  # flat or dotted config keys, on top of the suite's
    reference: Optional[str] = None
    resume_at: Optional[int] = None
    tolerance: Optional[Tolerance] = None  # variants only

    @property
    def is_reference(self) -> bool:
        return self.reference is None


@dataclass
class Suite:
    name: str
    path: str
    base_config: dict  # configs merged, then the suite's `set`, then --set
    tolerance: Tolerance
    references: list  # [Run]
    variants: list  # [Run]

    def runs(self) -> list:
        """References first (in file order), then variants."""
        return list(self.references) + list(self.variants)

    def run_config(self, run: Run) -> dict:
        """The flat config of `run` before the harness's own keys (see the module docstring)."""
        from bench_config import apply_overrides

        return apply_overrides(self.base_config, run.overrides)


def _fail(path: str, message: str) -> SuiteError:
    return SuiteError(f"{path}: {message}")


def _mapping(value: Any, path: str, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"{what} must be a mapping of key: value, got {type(value).__name__} {value!r}.")
    return {_normalize(str(k)): v for k, v in value.items()}


def _normalize(key: str) -> str:
    head, dot, rest = key.partition(".")
    return head.replace("-", "_") + dot + rest


def _tolerance(raw: Any, path: str, where: str, base: Optional[Tolerance]) -> Tolerance:
    raw = _mapping(raw, path, where)
    unknown = sorted(set(raw) - TOLERANCE_KEYS)
    if unknown:
        raise _fail(path, f"{where}: unknown key(s) {unknown}; the keys are {sorted(TOLERANCE_KEYS)}.")
    values = {} if base is None else {"train_loss": base.train_loss, "valid_loss": base.valid_loss,
                                      "window": base.window}
    for key in ("train_loss", "valid_loss"):
        if key in raw:
            value = raw[key]
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise _fail(path, f"{where}.{key}: {value!r} must be a number >= 0 (an absolute loss "
                                  f"difference), e.g. {key}: 5.0e-5.")
            values[key] = float(value)
    if "window" in raw:
        window = raw["window"]
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise _fail(path, f"{where}.window: {window!r} must be an integer >= 1 (logged points averaged).")
        values["window"] = window
    if "train_loss" not in values:
        raise _fail(path, f"{where}: set train_loss (the largest allowed |variant - reference| train loss).")
    values.setdefault("valid_loss", values["train_loss"])
    return Tolerance(**values)


def _check_name(name: Any, path: str, where: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise _fail(path, f"{where}: name {name!r} must be letters, digits, '_', '.', '-'.")
    return name


def _run(raw: Any, path: str, where: str, default_reference: Optional[str], tolerance: Tolerance) -> Run:
    if not isinstance(raw, dict):
        raise _fail(path, f"{where} must be a mapping with at least `name`, got {raw!r}.")
    unknown = sorted(set(raw) - RUN_KEYS)
    if unknown:
        raise _fail(path, f"{where}: unknown key(s) {unknown}; a run takes {sorted(RUN_KEYS)}.")
    name = _check_name(raw.get("name"), path, where)
    run = Run(name=name, overrides=_mapping(raw.get("set"), path, f"{where} ({name}).set"))
    if default_reference is None:  # a reference
        for key in ("reference", "resume_at", "tolerance"):
            if key in raw:
                raise _fail(path, f"{where} ({name}): `{key}` belongs to variants, not references.")
        return run
    run.reference = raw.get("reference", default_reference)
    run.resume_at = _resume_at(raw.get("resume_at"), path, f"{where} ({name})")
    run.tolerance = _tolerance(raw.get("tolerance"), path, f"{where} ({name}).tolerance", tolerance)
    return run


def _resume_at(value: Any, path: str, where: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(path, f"{where}.resume_at: {value!r} must be a step >= 1 (train to it, stop, resume).")
    return value


def read_configs(paths: list, suite_path: str, repo_root: str) -> dict:
    """The config files merged left to right (flat keys, dashes as underscores); a key in two files is an
    error, as in deepy.py."""
    from megatron.neox_args.loader import read_yaml_file

    merged: dict = {}
    origin: dict = {}
    for entry in paths:
        full = entry if os.path.isabs(entry) else os.path.join(repo_root, entry)
        if not os.path.isfile(full):
            raise _fail(suite_path, f"configs: {entry} does not exist (paths are relative to the repository "
                                    f"root {repo_root}).")
        for key, value in (read_yaml_file(full) or {}).items():
            key = _normalize(str(key))
            if key in merged:
                raise _fail(suite_path, f"configs: `{key}` is set in both {origin[key]} and {entry}; set it in "
                                        f"one file, or in the suite's `set`.")
            merged[key], origin[key] = value, entry
    return merged


def load_suite(path: str, repo_root: str, cli_set: Optional[dict] = None, cli_variants: Optional[list] = None,
               only: Optional[list] = None, skip: Optional[list] = None) -> Suite:
    """Read and check the suite file; add the command line's --set and --variant; apply --only/--skip.

    `cli_set` is tools/bench's parse_set output, `cli_variants` its parse_variants output
    ([(name, overrides)])."""
    from bench_config import apply_overrides
    from megatron.neox_args.loader import read_yaml_file

    if not os.path.isfile(path):
        raise SuiteError(f"suite file {path} does not exist.")
    raw = read_yaml_file(path) or {}
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; a suite has {sorted(SUITE_KEYS)}.")
    configs = raw.get("configs")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise _fail(path, "configs: give a list of config files, e.g. configs: [configs/tiny.yml].")
    base = apply_overrides(read_configs(configs, path, repo_root), _mapping(raw.get("set"), path, "set"))
    base = apply_overrides(base, cli_set or {})
    if "tolerance" not in raw:
        raise _fail(path, "tolerance: missing; e.g. tolerance: {train_loss: 5.0e-5}.")
    tolerance = _tolerance(raw["tolerance"], path, "tolerance", None)

    refs_raw = raw.get("references")
    if not isinstance(refs_raw, list) or not refs_raw:
        raise _fail(path, "references: give a list with at least one run, e.g. references: [{name: ref}].")
    references = [_run(r, path, f"references[{i}]", None, tolerance) for i, r in enumerate(refs_raw)]
    default_ref = references[0].name
    variants_raw = raw.get("variants") or []
    if not isinstance(variants_raw, list):
        raise _fail(path, "variants: must be a list of runs.")
    variants = [_run(v, path, f"variants[{i}]", default_ref, tolerance) for i, v in enumerate(variants_raw)]
    for name, overrides in cli_variants or []:
        overrides = dict(overrides)
        harness = {key: overrides.pop(key) for key in HARNESS_KEYS if key in overrides}
        variants.append(_run({"name": name, "set": overrides, **harness}, "--variant", f"--variant {name}",
                             default_ref, tolerance))

    names = [r.name for r in references + variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SuiteError(f"{path}: run names must differ; {duplicates} appear twice (suite file or --variant).")
    ref_names = {r.name for r in references}
    for variant in variants:
        if variant.reference not in ref_names:
            raise _fail(path, f"variant {variant.name}: reference {variant.reference!r} is not one of the suite's "
                              f"references {sorted(ref_names)}.")
        owned = sorted(k.split(".")[0] for k in variant.overrides if k.split(".")[0] in OWNED_KEYS)
        if owned:
            raise _fail(path, f"variant {variant.name}: {owned} are set by the harness (logs, port, checkpoints); "
                              f"remove them (use resume_at for a resume).")
    variants = _select(variants, only, skip, path)
    used = {v.reference for v in variants}
    references = [r for r in references if r.name in used] or references[:1]
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Suite(name=str(name), path=path, base_config=base, tolerance=tolerance, references=references,
                 variants=variants)


def _select(variants: list, only: Optional[list], skip: Optional[list], path: str) -> list:
    names = {v.name for v in variants}
    for option, chosen in (("--only", only), ("--skip", skip)):
        missing = sorted(set(chosen or []) - names)
        if missing:
            raise SuiteError(f"{option} {','.join(missing)}: no such variant in {path} or --variant; the "
                             f"variants are {', '.join(sorted(names)) or '(none)'}.")
    if only:
        variants = [v for v in variants if v.name in set(only)]
    return [v for v in variants if v.name not in set(skip or [])]

