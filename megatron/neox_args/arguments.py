"""NeoXArgs: the resolved configuration of a run, one typed section per concern plus the derived block.

    args = NeoXArgs.from_ymls(["configs/410M.yml", "configs/local_setup.yml"])
    args.model.hidden_size, args.training.train_iters, args.derived.data_parallel_size
    s = args.serialize(); NeoXArgs.from_serialized(s) == args   # exact JSON round trip

Building runs: load/merge (loader.py) -> type check (coerce.py) -> checks (validate.py, validate_io.py)
-> derived values (derive.py). Sections hold exactly what the user wrote (or defaults); computed values
live only in `derived`. Each module should receive its own section, not the whole NeoXArgs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from megatron.neox_args.coerce import coerce_value
from megatron.neox_args.derive import derive, pad_vocab_size
from megatron.neox_args.errors import DEFAULT_SOURCE, ConfigError
from megatron.neox_args.loader import Setting, merge_settings, read_yaml_file
from megatron.neox_args.registry import FIELDS
from megatron.neox_args.sections import (
    SECTIONS, CheckpointArgs, DataArgs, DerivedArgs, LauncherArgs, LoggingArgs, LRArgs, ModelArgs,
    OptimizerArgs, ParallelArgs, PrecisionArgs, TokenizerArgs, TrainingArgs,
)
from megatron.neox_args.validate import validate_sections
from megatron.neox_args.validate_io import validate_data, validate_tokenizer
from megatron.neox_args.world_size import compute_world_size

STEPS_PER_PRINT = 10**9
"""DeepSpeed's own step logging interval: effectively never (we log ourselves)."""


@dataclass
class NeoXArgs:
    """The typed, validated configuration; see the module docstring. Build it with a `from_*` method."""

    model: ModelArgs
    parallel: ParallelArgs
    optimizer: OptimizerArgs
    lr: LRArgs
    data: DataArgs
    tokenizer: TokenizerArgs
    precision: PrecisionArgs
    training: TrainingArgs
    checkpoint: CheckpointArgs
    logging: LoggingArgs
    launcher: LauncherArgs
    derived: DerivedArgs
    sources: dict = field(default_factory=dict, compare=False, repr=False)
    """Key -> the file (or "<dict>") that set it; keys not listed kept their default."""
    upstream_noops: dict = field(default_factory=dict, compare=False, repr=False)
    """GPT-NeoX keys accepted without effect here: key -> (file, what it did upstream and why nothing changes)."""
    upstream_notes: list = field(default_factory=list, compare=False, repr=False)
    """One line per GPT-NeoX key translated into our keys (precision, fp32_allreduce, DeepSpeed block quirks)."""

    # --- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_ymls(cls, paths: Sequence[str], world_size: Optional[int] = None) -> "NeoXArgs":
        """Read, merge (left to right; a key set twice is an error), validate and derive.

        world_size None: computed from the launcher keys (hostfile, num_nodes, num_gpus, include/exclude).
        """
        if isinstance(paths, (str, bytes)):
            paths = [paths]
        if not paths:
            raise ConfigError("no config files given; pass one or more YAML files, e.g. configs/tiny.yml.")
        documents = [(read_yaml_file(path), str(path)) for path in paths]
        return cls._build(merge_settings(documents), world_size, check_files=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>",
                  world_size: Optional[int] = None) -> "NeoXArgs":
        """As from_ymls for one flat mapping (nested `optimizer:` block allowed); errors name `source`."""
        return cls._build(merge_settings([(d, source)]), world_size, check_files=True)

    @classmethod
    def from_serialized(cls, s: str) -> "NeoXArgs":
        """Inverse of serialize(): type-checks the values and restores the derived block as saved.

        It does not re-run validation or recompute derived values (the run was validated at launch, and
        a checkpoint's config must load on a machine without its data files).
        """
        try:
            payload = json.loads(s)
        except json.JSONDecodeError as err:
            raise ConfigError(f"the serialized config is not valid JSON: {err}.") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("derived"), dict):
            raise ConfigError("the serialized config must be a JSON object with a `derived` block, as written "
                              "by NeoXArgs.serialize().")
        derived_values = payload.pop("derived")
        derived_names = {f.name for f in dataclasses.fields(DerivedArgs)}
        unknown = sorted(set(derived_values) - derived_names)
        if unknown:
            raise ConfigError(f"the serialized config's derived block has unknown keys {unknown}.")
        settings = merge_settings([(payload, "<serialized>")])
        sections = cls._sections_from(settings)
        derived = DerivedArgs(**derived_values)
        return cls(**sections, derived=derived, sources={k: s.source for k, s in settings.items()})

    @classmethod
    def _sections_from(cls, settings: Mapping[str, Setting]) -> dict[str, Any]:
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, setting in settings.items():
            spec = FIELDS[key]
            try:  # messages show the key as the user spelled it (`optimizer.type`, `train-iters`)
                values[spec.section][key] = coerce_value(setting.spelling, copy.deepcopy(setting.value),
                                                         spec.annotation, setting.source)
            except ConfigError as err:
                err.key = key
                raise
        return {name: SECTIONS[name](**values[name]) for name in SECTIONS}

    @classmethod
    def _build(cls, settings: Mapping[str, Setting], world_size: Optional[int], check_files: bool) -> "NeoXArgs":
        sections = cls._sections_from(settings)
        sources = {key: setting.source for key, setting in settings.items()}
        args = cls(**sections, derived=DerivedArgs(), sources=sources,
                   upstream_noops=dict(getattr(settings, "noops", {})),
                   upstream_notes=list(getattr(settings, "notes", [])))
        validate_sections(args, sources)
        validate_data(args.data, sources, check_files)
        validate_tokenizer(args.tokenizer, sources, check_files)
        if world_size is None and getattr(settings, "world_size", None) is not None:
            world_size = settings.world_size  # global_num_gpus: upstream's batch arithmetic uses it as given
            launched = compute_world_size(args.launcher) if check_files else world_size
            if launched != world_size:
                raise ConfigError(f"global_num_gpus: {world_size} ({settings.world_size_source}) but the "
                                  f"hostfile/include/exclude/num_nodes give {launched} ranks; remove global_num_gpus "
                                  f"(the world size is computed from them) or make them agree.",
                                  key="global_num_gpus")
        if world_size is None:
            world_size = compute_world_size(args.launcher)
        elif isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world_size {world_size!r} must be a positive integer.")
        args.derived = derive(args.model, args.parallel, args.lr, args.precision, args.training,
                              world_size, sources)
        return args

    # --- output ------------------------------------------------------------------------------------------

    def section_items(self) -> list[tuple[str, Any]]:
        """[(section name, section object)] in SECTIONS order."""
        return [(name, getattr(self, name)) for name in SECTIONS]

    def to_dict(self) -> dict:
        """Flat `{key: value}` of every user field (defaults included) plus `derived: {...}`; deep copies."""
        flat: dict[str, Any] = {}
        for _, section in self.section_items():
            for f in dataclasses.fields(section):
                flat[f.name] = copy.deepcopy(getattr(section, f.name))
        flat["derived"] = dataclasses.asdict(self.derived)
        return flat

    def serialize(self) -> str:
        """JSON of to_dict() (tuples become lists; from_serialized restores them)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config: batch sizes, clipping, bf16/fp16, ZeRO. No optimizer/scheduler blocks:
        we build those ourselves and pass them to deepspeed.initialize."""
        config = {
            "train_batch_size": self.derived.train_batch_size,
            "train_micro_batch_size_per_gpu": self.derived.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": self.derived.gradient_accumulation_steps,
            "gradient_clipping": self.training.gradient_clipping,
            "bf16": copy.deepcopy(self.precision.bf16),
            "fp16": copy.deepcopy(self.precision.fp16),
            "zero_optimization": copy.deepcopy(self.parallel.zero_optimization),
            "steps_per_print": STEPS_PER_PRINT,
            "wall_clock_breakdown": False,
            # DeepSpeed's throughput timer (on by default) synchronizes the device at every forward and
            # every engine.step() to time them; our ThroughputMeter reports tokens/s without waiting
            "timers": {"throughput": {"enabled": False}},
        }
        if self.parallel.pipe_parallel_size > 1 and self.parallel.sequence_parallel:
            # the pipeline engine would send each tensor rank 1/tp of the stage output and all-gather it on the
            # next stage, which assumes the activations are the same on every tensor rank; under sequence
            # parallelism each rank holds its own sequence shard
            config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        if self.precision.data_types:
            config["data_types"] = copy.deepcopy(self.precision.data_types)
        if self.precision.communication_data_type is not None:
            config["communication_data_type"] = self.precision.communication_data_type
        config.update(copy.deepcopy(self.precision.deepspeed_extra_args))
        return config

    def set_vocab_size(self, vocab_size: int) -> None:
        """Record the tokenizer's vocabulary size and its padded size (a multiple of
        make_vocab_size_divisible_by * model_parallel_size, so every tensor shard is equal)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ConfigError(f"vocab size {vocab_size!r} must be a positive integer.")
        self.derived.vocab_size = vocab_size
        self.derived.padded_vocab_size = pad_vocab_size(vocab_size, self.model.make_vocab_size_divisible_by,
                                                        self.parallel.model_parallel_size)

    def source_of(self, key: str) -> str:
        """The file that set `key`, or "default"."""
        return self.sources.get(key, DEFAULT_SOURCE)
