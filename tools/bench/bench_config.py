"""From a benchmark spec (size name, seq, micro-batch, device, `--set` overrides) to a resolved NeoXArgs.

Both sides use it: ours trains with it, the baselines take the model shape and FLOP count from it.
Precedence, lowest first: the size config (`configs/<size>.yml`), the benchmark's fixed keys (seq and
micro-batch from the command line, `--grad-accum` micro-batches per step, bf16 on cuda / fp32 on cpu, the synthetic
data, no checkpoints or evaluation), then every `--set key=value` (so `--set` can override anything).
"""

from __future__ import annotations

import copy
import os
from typing import Any

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SIZE_CONFIGS = {
    "tiny": "configs/tiny.yml",
    "125M": "configs/125M.yml",
    "410M": "configs/410M.yml",
    "1.3B": "configs/1-3B.yml",
    "llama-1B": "configs/llama-1B.yml",
    "2.7B": "configs/2-7B.yml",
    "6.9B": "configs/6-9B.yml",
}
"""Size name on the command line -> size config (relative to the repository root)."""

GPT2_VOCAB = 50277
"""The GPT-NeoX tokenizer's vocabulary; padded to 50304 with make_vocab_size_divisible_by 128."""
TINY_VOCAB = 1000
"""The `tiny` size's vocabulary (padded to 1024): CPU smoke tests stay fast."""


LLAMA_VOCAB = 32768
"""The Llama-shape benchmarks' vocabulary (a 32k SentencePiece-sized table, as in the torchtitan comparison)."""


def vocab_for(size: str) -> int:
    return {"tiny": TINY_VOCAB, "llama-1B": LLAMA_VOCAB}.get(size, GPT2_VOCAB)


def config_path(size: str) -> str:
    """Absolute path of the size config; a size that is not a known name may be a YAML path itself."""
    if size in SIZE_CONFIGS:
        return os.path.join(REPO_ROOT, SIZE_CONFIGS[size])
    if size.endswith((".yml", ".yaml")) and os.path.isfile(size):
        return os.path.abspath(size)
    raise ValueError(f"unknown size {size!r}: use one of {', '.join(SIZE_CONFIGS)} or a path to a YAML config.")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["torch_compile=true", "zero_optimization.stage=0"]` -> {"torch_compile": True,
    "zero_optimization.stage": 0}. Values are read by the config loader's YAML rules (true, null, [1, 2];
    `1e-4` is a float as in config files); dashes in the first key part become underscores."""
    from megatron.neox_args.loader import parse_yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set torch_compile=true")
        head, dot, rest = key.partition(".")
        parsed = parse_yaml(f"value: {value}\n", f"--set {item}")["value"] if value.strip() else None
        out[head.replace("-", "_") + dot + rest] = parsed
    return out


def apply_overrides(config: dict, overrides: dict[str, Any]) -> dict:
    """A copy of `config` with each (possibly dotted) key set; dotted keys create nested dicts."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return config


def bench_config_dict(spec: dict) -> dict:
    """The flat config dict of one run (see the module docstring for the precedence)."""
    from megatron.neox_args.loader import read_yaml_file

    config = dict(read_yaml_file(config_path(spec["size"])) or {})
    cuda = spec["device"] == "cuda"
    iterations = spec["warmup"] + spec["steps"] + spec.get("extra_steps", 0)
    for key in ("train_batch_size", "train-batch-size", "lr_decay_iters", "lr-decay-iters", "train_data_paths",
                "valid_data_paths", "test_data_paths", "save", "load"):
        config.pop(key, None)
    fixed = {
        "seq_length": spec["seq"],
        "max_position_embeddings": spec["seq"],
        "train_micro_batch_size_per_gpu": spec["micro_batch"],
        "gradient_accumulation_steps": spec.get("grad_accum", 1),
        "train_iters": iterations,
        "eval_interval": iterations + 1,
        "eval_iters": 1,
        "data_path": spec["data_prefix"],
        "data_cache_dir": spec["cache_dir"],
        "split": "1,0,0",
        "tokenizer_type": "ByteLevelTokenizer",  # needs no files; the vocabulary is set by set_vocab_size
        "num_workers": config.get("num_workers", 2) if cuda else 0,
        "checkpoint_factor": None,
        "log_dir": os.path.join(spec["cache_dir"], "logs"),
        "bf16": dict(config.get("bf16") or {}, enabled=cuda),  # other keys of the block are kept
        "fp16": {"enabled": False},
        "num_gpus": 1,
    }
    config.update(fixed)
    return apply_overrides(config, spec.get("overrides") or {})


def build_neox_args(spec: dict):
    """NeoXArgs of the run for world size 1, with the vocabulary of the size set (padded by the config)."""
    from megatron.neox_args import NeoXArgs

    source = f"{os.path.relpath(config_path(spec['size']), REPO_ROOT)} + benchmark settings/--set"
    args = NeoXArgs.from_dict(bench_config_dict(spec), source=source, world_size=1)
    args.set_vocab_size(vocab_for(spec["size"]))
    return args


def describe_ours(args, device: str) -> str:
    """Short notes on the settings of our side that change speed (ZeRO stage, checkpointing, compile, ...),
    with the unset keys resolved for `device` as training resolves them."""
    notes = [f"zero{args.parallel.zero_optimization.get('stage', 0)}", args.derived.precision]
    accum = args.precision.data_types.get("grad_accum_dtype")
    if accum and accum != args.derived.precision:
        notes.append(f"{accum} grad accum")
    if args.training.checkpoint_activations:
        notes.append(f"ckpt-act/{args.training.checkpoint_num_layers}")
    from megatron.training.device_defaults import resolve_for_args

    choices = resolve_for_args(args, device)
    if choices.torch_compile:
        notes.append("compile")
    if choices.attention_impl != "sdpa" or choices.sdpa_backend:
        notes.append(choices.sdpa_backend or choices.attention_impl)
    if choices.mlp_impl != "torch":
        notes.append(f"{choices.mlp_impl} mlp" + (", autotuned" if choices.mlp_autotune else ""))
    from megatron.engine.optimizer_kind import BF16
    from megatron.neox_args.derive import optimizer_wrapper_for

    if (device == "cuda" and args.precision.fused_optimizer_step is not False
            and optimizer_wrapper_for(args.precision, args.parallel)[0] == BF16):
        notes.append("fused step")
    if args.derived.gradient_accumulation_steps > 1:
        notes.append(f"grad-acc {args.derived.gradient_accumulation_steps}")
    offload = args.parallel.zero_optimization.get("offload_optimizer") or {}
    if offload.get("device") == "cpu":
        notes.append("optimizer on cpu" + (" (pinned)" if offload.get("pin_memory") else ""))
    if args.model.mlp_chunk_size:
        notes.append(f"mlp chunks {args.model.mlp_chunk_size}")
    if args.training.checkpoint_in_cpu:
        notes.append("ckpt inputs on host")
    if args.training.checkpoint_keep_attention:
        notes.append("attention kept")
    if args.training.recompute_modules:
        notes.append("recompute " + "+".join(args.training.recompute_modules))
    if args.data.reset_attention_mask:
        notes.append("documents")
    return ", ".join(notes)
