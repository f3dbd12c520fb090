"""GPT-NeoX's own keys: the one table of what this trainer does with a key of an upstream config.

A GPT-NeoX user's YAML runs unchanged when every key in it is one of:
- a field of sections.py with GPT-NeoX's name, meaning and default (most keys);
- a *no-op* key (`NOOP_KEYS`): it only tunes upstream's kernels, logging or tools that have no
  counterpart in training here, so the numbers trained are the same with or without it. Some are no-ops
  only at certain values (`output_layer_parallelism: column`, `te_mha: false`); any other value is refused;
- a *rename* (`translate_renames`): `precision`, `fp32_allreduce`, `attention_config`, `global_num_gpus`
  and the quirks of upstream's DeepSpeed blocks (`"fp16": {"fp16": true}`, `"type": "bfloat16"`, loss
  scaling inside `bf16`) become the fields that mean the same thing here.
Everything else is refused, all at once (the loader collects every refusal of every file into one
message): architectures not built here (Mamba, RWKV, gMLP, MoE, sparse attention, Transformer Engine)
and keys that would change the math if ignored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from megatron.neox_args.errors import ConfigError


@dataclass(frozen=True)
class NoOp:
    """An upstream key accepted without effect: `why` says what it did upstream and why nothing changes
    here; `accepts(value)` says which values are no-ops (others are refused with `refusal`)."""

    why: str
    accepts: Callable[[Any], bool] = lambda value: True
    refusal: str = ""


def _falsy(value: Any) -> bool:
    return value in (False, None, 0, "", [], {})


_KERNEL = "selects one of GPT-NeoX's fused CUDA kernels for the same math; this trainer uses torch's kernels"
_GENERATE = "read only by GPT-NeoX's generate.py (text generation), not by training; this repository has no " \
            "generation script"
_COMET = "Comet ML logging settings, read only when use_comet is true; use use_wandb or tensorboard_dir"

NOOP_KEYS: dict[str, NoOp] = {
    "scaled_upper_triang_masked_softmax_fusion": NoOp(_KERNEL + " (causal softmax: SDPA here)"),
    "scaled_masked_softmax_fusion": NoOp(_KERNEL + " (masked softmax: SDPA here)"),
    "rope_fusion": NoOp(_KERNEL + " (rotary)"),
    "layernorm_fusion": NoOp(_KERNEL + " (LayerNorm: torch's fused layer_norm here)"),
    "rmsnorm_fusion": NoOp(_KERNEL + " (RMSNorm)"),
    "bias_dropout_fusion": NoOp(_KERNEL + " (bias + dropout + residual)"),
    "use_flashattn_swiglu": NoOp(_KERNEL + " (SwiGLU)"),
    "mamba_selective_scan_fusion": NoOp(_KERNEL + " of Mamba layers (Mamba itself is refused)"),
    "mamba_causal_conv_fusion": NoOp(_KERNEL + " of Mamba layers (Mamba itself is refused)"),
    "mamba_inner_func_fusion": NoOp(_KERNEL + " of Mamba layers (Mamba itself is refused)"),
    "gmlp_attn_dim": NoOp("the attention width inside gMLP blocks; GPT layers never read it"),
    "synchronize_each_layer": NoOp("a device synchronize around each checkpointed layer, for profiling; it "
                                   "does not change results"),
    "distributed_backend": NoOp("the torch.distributed backend; this trainer uses nccl on GPUs and gloo on CPU",
                                lambda v: v in ("nccl", "gloo", None),
                                "only nccl (GPU) or gloo (CPU) exist here; remove the key"),
    "steps_per_print": NoOp("DeepSpeed's own progress print; this trainer prints every log_interval steps"),
    "wall_clock_breakdown": NoOp("DeepSpeed's per-phase timers (they synchronize the device); this trainer "
                                 "reports step time and throughput itself"),
    "output_layer_parallelism": NoOp("how the output layer is split; column (over the vocabulary) is the only "
                                     "choice upstream and here", lambda v: v == "column",
                                     "only `column` exists (upstream allows nothing else either)"),
    "checkpoint_validation_with_forward_pass": NoOp(
        "at false, nothing (the default)", _falsy,
        "saving a forward pass with each checkpoint to re-check it on load is not implemented; checkpoints "
        "here record a checksum of every file instead; set it to false or remove it"),
    "log_grad_norm": NoOp("logs the gradient norm; this trainer always logs grad_norm"),
    "override_lr_scheduler": NoOp("upstream: take the schedule from the config rather than the checkpoint; "
                                  "here the schedule is always the config's formula (only the step count is "
                                  "saved), which is what true means"),
    "use_checkpoint_lr_scheduler": NoOp("upstream: take the schedule from the checkpoint; here it is always the "
                                        "config's (only the step count is saved)", _falsy,
                                        "the checkpoint stores no schedule to use; write the schedule keys"),
    "use_comet": NoOp("at false, nothing", _falsy,
                      "Comet ML logging is not implemented; use use_wandb: true or tensorboard_dir"),
    "comet_workspace": NoOp(_COMET),
    "comet_project": NoOp(_COMET),
    "comet_experiment_name": NoOp(_COMET),
    "comet_tags": NoOp(_COMET),
    "comet_others": NoOp(_COMET),
    "memory_profiling": NoOp("at false, nothing", _falsy,
                             "torch memory snapshots are not implemented; use tools/bench (peak_mem_gib) or "
                             "remove the key"),
    "memory_profiling_path": NoOp("where memory_profiling writes; only read when memory_profiling is true"),
    "profile": NoOp("at false, nothing", _falsy,
                    "nsys/torch profiler ranges are not implemented; run tools/bench or your own profiler around "
                    "train.py, and remove the key"),
    "profile_step_start": NoOp("first profiled step; only read when profile is true"),
    "profile_step_stop": NoOp("last profiled step; only read when profile is true"),
    "use_bnb_optimizer": NoOp("at false, nothing", _falsy,
                              "bitsandbytes 8-bit optimizers are not implemented; remove the key"),
    "moe_num_experts": NoOp("at 1, no MoE layers (the default)", lambda v: v in (1, None),
                            "mixture-of-experts layers are not built by this trainer"),
    "te_fp8_format": NoOp("Transformer Engine FP8 setting; TE layers are not used (te_* layers false)"),
    "te_fp8_wgrad": NoOp("Transformer Engine FP8 setting; TE layers are not used"),
    "te_fp8_amax_history_len": NoOp("Transformer Engine FP8 setting; TE layers are not used"),
    "te_fp8_amax_compute_algo": NoOp("Transformer Engine FP8 setting; TE layers are not used"),
    "te_fp8_margin": NoOp("Transformer Engine FP8 setting; TE layers are not used"),
    "te_fp8_mha": NoOp("at false, nothing", _falsy, "Transformer Engine layers are not built by this trainer"),
    **{key: NoOp("at false, nothing: upstream's own layers are used", _falsy,
                 "Transformer Engine layers are not built by this trainer; set it to false")
       for key in ("te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha")},
    **{key: NoOp(_GENERATE) for key in ("text_gen_type", "temperature", "top_p", "top_k", "maximum_tokens",
                                        "prompt_end", "sample_input_file", "sample_output_file", "num_samples",
                                        "recompute", "return_logits", "eval_results_prefix",
                                        "precompute_model_name")},
    "attention_softmax_in_fp32": NoOp("upstream: run its masked softmax in fp32; the SDPA kernels used here "
                                      "accumulate the softmax in fp32 for bf16/fp16 inputs already"),
    "rotary_save_freqs_buffer": NoOp("whether upstream's checkpoints hold the rotary inv_freq buffer; ours never "
                                     "do (it is recomputed), which changes nothing trained"),
    "fp16_lm_cross_entropy": NoOp("at false, nothing (the default)", _falsy,
                                  "the cross entropy always runs in fp32 here; a 16-bit loss is not implemented"),
    "eval_tasks": NoOp("lm-evaluation-harness tasks for upstream's evaluate.py, not read by training"),
    "git_hash": NoOp("filled in by upstream at launch; informational"),
    "deepspeed": NoOp("upstream's always-true flag; DeepSpeed is always used here", lambda v: v in (True, None),
                      "this trainer always runs on DeepSpeed; remove the key"),
    "use_shared_fs": NoOp("at true, nothing (the default)", lambda v: v in (True, None),
                          "each node building its own data index caches is not implemented"),
}
"""Upstream key -> what it does there and why accepting it changes nothing here."""

UNSUPPORTED_KEYS: dict[str, str] = {
    "sparsity_config": "sparse attention (DeepSpeed's block-sparse kernels) is not built by this trainer; remove "
                       "it (and the sparse types from attention_config) for dense causal attention",
    "num_unique_layers": "sharing parameters between layers is not implemented",
    "expansion_factor": "write intermediate_size instead (expansion_factor x hidden_size)",
    "use_mup": "muP is not implemented",
    "soft_prompt_tuning": "soft-prompt tuning is not implemented",
    "train_epochs": "give train_iters (optimizer steps) instead",
    "lr_decay_fraction": "give lr_decay_iters instead",
    "checkpoint_scale": "only linear checkpoint spacing (checkpoint_factor) exists, plus extra_save_iters",
    "weight_by_num_documents": "blending weights come from train_data_weights (equal by default)",
    "apply_query_key_layer_scaling": "query-key layer scaling is not implemented",
    "use_qk_layernorm": "QK normalization is not implemented",
    "gpt_j_tied": "tied norms of the parallel residual are not implemented; gpt_j_residual uses two norms",
    "opt_pos_emb_offset": "OPT's position offset is not implemented",
    "train_impl": "only normal language-model training exists (no DPO/KTO/RM/REINFORCE)",
    "dataset_impl": "only the gpt2 .bin/.idx dataset exists here",
    "pack_impl": "documents are always packed (upstream's default `packed`)",
    "moe_top_k": "mixture-of-experts layers are not built by this trainer",
    "z_loss": "the z-loss is not implemented",
}
"""Upstream keys refused outright, with what to do instead."""

NOT_UPSTREAM_KEYS: dict[str, str] = {
    "warmup_iters": "it is not a GPT-NeoX key either (upstream rejects it): warmup is `warmup`, a fraction of "
                    "lr_decay_iters (e.g. warmup: 0.01)",
    "decay_lr_to": "it is not a GPT-NeoX key either (upstream rejects it): write min_lr (the learning rate the "
                   "decay ends at), e.g. min_lr = decay_lr_to x lr",
    "attention_type": "it is not a GPT-NeoX key either (upstream rejects it): grouped-query attention is "
                      "num_kv_heads",
}
"""Keys found in upstream's config files that upstream itself does not define."""

ARCHITECTURE_ATTENTION_TYPES = {
    "local": "local (windowed) attention layers of attention_config",
    "sparse_fixed": "sparse attention", "sparse_variable": "sparse attention", "bigbird": "sparse attention",
    "bslongformer": "sparse attention", "gmlp": "gMLP blocks", "amlp": "aMLP blocks", "mamba": "Mamba blocks",
    "rwkv": "RWKV blocks",
}
"""attention_config layer types this trainer does not build (global and flash are dense causal attention)."""

FP16_LOSS_SCALING_KEYS = ("loss_scale", "loss_scale_window", "initial_scale_power", "hysteresis",
                          "consecutive_hysteresis", "min_loss_scale", "auto_cast", "type")
"""DeepSpeed fp16-block keys that upstream's bf16 blocks carry and that mean nothing for bf16."""

RENAME_DOCS = {
    "precision": "fp16 -> `fp16: {enabled: true}`; bfloat16 -> `bf16: {enabled: true}`; fp32 -> neither (a block "
                 "that disagrees is an error)",
    "fp32_allreduce": "true -> `communication_data_type: fp32` (gradients summed over replicas in fp32)",
    "attention_config": "only global/flash layers: dense causal attention (SDPA, flash kernel where available); "
                        "the counts must add up to num_layers; other layer types are refused",
    "peak_theoretical_tflops": "`peak_flops_per_device` x 1e12 (the same peak for MFU, in FLOP/s)",
    "global_num_gpus": "`num_gpus` on one node; with a hostfile/include/exclude/num_nodes, the world size used for "
                       "the batch arithmetic (as upstream)",
    "fp16.fp16 (inside the block)": "DeeperSpeed's spelling of fp16.enabled; dropped (DeepSpeed rejects it)",
    "fp16.type: bfloat16": "`bf16: {enabled: true}` and the fp16 block off (loss-scaling keys dropped)",
    "bf16.bf16 and loss-scaling keys inside bf16": "dropped: bf16 needs no loss scaling (DeepSpeed's bf16 block "
                                                   "rejects them)",
}
"""What each rename becomes (documentation, docs/CONFIG.md)."""

RENAMED_KEYS = ("precision", "fp32_allreduce", "attention_config", "global_num_gpus", "peak_theoretical_tflops")
"""Upstream keys that are translated into our fields by `translate_renames`."""


def classify(key: str, value: Any) -> tuple[str, str]:
    """("noop", why) / ("rename", "") / ("refuse", what to do) / ("unknown", "") for an upstream key."""
    if key in RENAMED_KEYS:
        return "rename", ""
    if key in NOOP_KEYS:
        entry = NOOP_KEYS[key]
        if entry.accepts(value):
            return "noop", entry.why
        return "refuse", f"{key}: {value!r} is not supported: {entry.refusal}"
    if key in UNSUPPORTED_KEYS:
        return "refuse", f"GPT-NeoX's `{key}` is not supported: {UNSUPPORTED_KEYS[key]}"
    if key in NOT_UPSTREAM_KEYS:
        return "refuse", f"unknown key `{key}`: {NOT_UPSTREAM_KEYS[key]}"
    return "unknown", ""


# --- renames, applied after all files are merged -------------------------------------------------------------

def _layer_types(attention_config: Any, source: str) -> list[str]:
    """[[["global"], 12]] / [[["local", "global"], "all"]] -> the layer types named (order irrelevant here)."""
    example = 'e.g. [[["global"], 12]] (a list of [types, count] pairs)'
    if not isinstance(attention_config, list) or not attention_config:
        raise ConfigError(f"attention_config: {attention_config!r} in {source} must be a list of [layer types, "
                          f"count] pairs, {example}.", key="attention_config", sources=[source])
    types = []
    for item in attention_config:
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], (list, tuple))
                or not all(isinstance(t, str) for t in item[0])):
            raise ConfigError(f"attention_config entry {item!r} in {source} must be [[types...], count], "
                              f"{example}.", key="attention_config", sources=[source])
        types.extend(item[0])
    return types


def attention_config_problems(value: Any, source: str, num_layers: int) -> list[str]:
    """Refusals for an attention_config (architectures not built here, or a count that is not num_layers)."""
    types = _layer_types(value, source)
    problems = []
    unbuilt = sorted({t for t in types if t not in ("global", "flash")})
    for t in unbuilt:
        what = ARCHITECTURE_ATTENTION_TYPES.get(t)
        if what is None:
            problems.append(f"attention_config type `{t}` is not a GPT-NeoX attention type (global, flash, local, "
                            f"sparse_*, bigbird, bslongformer, gmlp, amlp, mamba, rwkv)")
        else:
            problems.append(f"attention_config type `{t}`: {what} are not built by this trainer; use "
                            f"[[[\"global\"], {num_layers}]] (dense causal attention, flash kernel via SDPA)")
    if not unbuilt:
        total = 0
        for types_, count in value:
            if count == "all":
                total = num_layers
                break
            if isinstance(count, bool) or not isinstance(count, int):
                problems.append(f"attention_config count {count!r} must be an integer or \"all\"")
                return problems
            total += count * len(types_)
        if total != num_layers:
            problems.append(f"attention_config covers {total} layers but num_layers is {num_layers}; the counts "
                            f"must add up to num_layers")
    return problems


def _conflict(key: str, first_source: str, other: str, other_source: str, detail: str) -> ConfigError:
    return ConfigError(f"`{key}` in {first_source} and `{other}` in {other_source} disagree: {detail}. Keep "
                       f"one of them.", key=other, sources=[first_source, other_source])


def normalize_precision_blocks(fp16: Optional[dict], bf16: Optional[dict], fp16_source: str,
                               bf16_source: str) -> tuple[Optional[dict], Optional[dict], list[str]]:
    """Upstream's DeepSpeed block quirks -> blocks DeepSpeed accepts; returns (fp16, bf16, notes).

    - `fp16: {fp16: true, ...}`: the inner flag is DeeperSpeed's old spelling of `enabled`; dropped
      (and used as `enabled` when `enabled` is missing).
    - `fp16: {type: bfloat16, enabled: true, ...}`: DeeperSpeed's way to ask for bf16; becomes
      `bf16: {enabled: true}` with the fp16 block off (its loss-scaling keys do nothing in bf16).
    - `bf16: {bf16: true, loss_scale..., hysteresis...}`: bf16 needs no loss scaling; the fp16 loss-scaling
      keys (FP16_LOSS_SCALING_KEYS) are dropped, any other unknown key is left for DeepSpeed to refuse.
    """
    notes = []
    fp16 = copy.deepcopy(fp16) if isinstance(fp16, dict) else fp16
    bf16 = copy.deepcopy(bf16) if isinstance(bf16, dict) else bf16
    if isinstance(fp16, dict):
        if "fp16" in fp16:
            inner = fp16.pop("fp16")
            fp16.setdefault("enabled", inner)
            notes.append(f"fp16.fp16 ({fp16_source}): DeeperSpeed's spelling of fp16.enabled, dropped")
        kind = fp16.pop("type", None)
        if kind in ("bfloat16", "bf16"):
            if fp16.get("enabled", False):
                if isinstance(bf16, dict) and bf16.get("enabled") is False:
                    raise _conflict("fp16.type: bfloat16", fp16_source, "bf16.enabled: false", bf16_source,
                                    "one asks for bf16 and the other turns it off")
                bf16 = {**(bf16 or {}), "enabled": True}
            notes.append(f"fp16.type: bfloat16 ({fp16_source}): DeeperSpeed's way to ask for bf16, written as "
                         f"bf16: {{enabled: true}}; its loss-scaling keys do nothing in bf16 and are dropped")
            fp16 = {"enabled": False}
        elif kind not in (None, "fp16", "float16"):
            raise ConfigError(f"fp16.type: {kind!r} in {fp16_source} must be fp16 or bfloat16 (DeeperSpeed's "
                              f"key); remove it or write bf16: {{enabled: true}}.", key="fp16", sources=[fp16_source])
    if isinstance(bf16, dict):
        if "bf16" in bf16:
            inner = bf16.pop("bf16")
            bf16.setdefault("enabled", inner)
        dropped = sorted(k for k in bf16 if k in FP16_LOSS_SCALING_KEYS)  # a typo stays, for DeepSpeed to refuse
        for k in dropped:
            del bf16[k]
        if dropped:
            notes.append(f"bf16 ({bf16_source}): {dropped} are fp16 loss-scaling keys that do nothing in bf16 "
                         f"(bf16 needs no loss scaling); dropped")
    return fp16, bf16, notes


def translate_renames(raw: Mapping[str, tuple[Any, str, str]], get: Callable[[str], Optional[tuple]],
                      ) -> tuple[dict[str, tuple[Any, str, str]], list[str], list[str]]:
    """Settings for our fields implied by upstream renames.

    raw: renamed key -> (value, source, spelling); get(field) -> (value, source, spelling) of a field already
    set, or None. Returns ({field: (value, source, spelling)} to set or replace, notes, refusals).
    """
    out: dict[str, tuple[Any, str, str]] = {}
    notes: list[str] = []
    refusals: list[str] = []

    # precision: fp16 | bfloat16 | fp32, with the DeepSpeed blocks (consistent, or it is an error)
    fp16_set, bf16_set = get("fp16"), get("bf16")
    fp16 = fp16_set[0] if fp16_set else None
    bf16 = bf16_set[0] if bf16_set else None
    fp16_src = fp16_set[1] if fp16_set else "default"
    bf16_src = bf16_set[1] if bf16_set else "default"
    if isinstance(fp16, dict) or isinstance(bf16, dict):
        new_fp16, new_bf16, block_notes = normalize_precision_blocks(fp16, bf16, fp16_src, bf16_src)
        notes += block_notes
        if new_fp16 != fp16:
            out["fp16"] = (new_fp16, fp16_src, "fp16")
        if new_bf16 != bf16:
            out["bf16"] = (new_bf16, bf16_set[1] if bf16_set else fp16_src, "bf16")
        fp16, bf16 = new_fp16, new_bf16
    if "precision" in raw:
        value, source, spelling = raw["precision"]
        fp16_on = isinstance(fp16, dict) and fp16.get("enabled", False)
        bf16_on = isinstance(bf16, dict) and bf16.get("enabled", False)
        if value == "fp16":
            if bf16_on:
                raise _conflict(spelling, source, "bf16.enabled: true", bf16_src, "precision is fp16")
            out["fp16"] = ({**(fp16 if isinstance(fp16, dict) else {}), "enabled": True},
                           source if not fp16_on else fp16_src, "fp16")
        elif value in ("bfloat16", "bf16"):
            if fp16_on:
                raise _conflict(spelling, source, "fp16.enabled: true", fp16_src, "precision is bfloat16")
            out["bf16"] = ({**(bf16 if isinstance(bf16, dict) else {}), "enabled": True},
                           source if not bf16_on else bf16_src, "bf16")
        elif value in ("fp32", "float32"):
            if fp16_on or bf16_on:
                raise _conflict(spelling, source, "fp16/bf16.enabled: true", fp16_src if fp16_on else bf16_src,
                                "precision is fp32")
        else:
            raise ConfigError(f"precision: {value!r} in {source} must be fp16, bfloat16 or fp32 (GPT-NeoX's key); "
                              f"or write bf16: {{enabled: true}} / fp16: {{enabled: true}}.", key="precision",
                              sources=[source])
        notes.append(f"precision: {value} ({source}) -> the {'bf16' if value != 'fp16' else 'fp16'} block"
                     if value not in ("fp32", "float32") else f"precision: fp32 ({source}): no block enabled")

    if "fp32_allreduce" in raw:
        value, source, spelling = raw["fp32_allreduce"]
        if not isinstance(value, bool):
            raise ConfigError(f"fp32_allreduce: {value!r} in {source} must be true or false.",
                              key="fp32_allreduce", sources=[source])
        current = get("communication_data_type")
        if value:
            if current is not None and current[0] not in ("fp32", None):
                raise _conflict(spelling, source, "communication_data_type", current[1],
                                f"fp32_allreduce asks for fp32, communication_data_type is {current[0]}")
            out["communication_data_type"] = ("fp32", source, spelling)
            notes.append(f"fp32_allreduce: true ({source}) -> communication_data_type: fp32")

    if "global_num_gpus" in raw:
        value, source, spelling = raw["global_num_gpus"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"global_num_gpus: {value!r} in {source} must be a positive integer.",
                              key="global_num_gpus", sources=[source])
        multi = [k for k in ("hostfile", "include", "exclude", "num_nodes") if get(k) is not None]
        num_gpus = get("num_gpus")
        if multi:  # upstream: the total GPU count for the batch arithmetic; the hosts come from the hostfile
            out["__world_size__"] = (value, source, spelling)
            notes.append(f"global_num_gpus: {value} ({source}) -> the world size (checked against "
                         f"{', '.join(multi)} when launching)")
        elif num_gpus is not None and num_gpus[0] != value:
            raise _conflict(spelling, source, "num_gpus", num_gpus[1],
                            f"global_num_gpus is {value}, num_gpus is {num_gpus[0]} on one node")
        else:
            out["num_gpus"] = (value, source, spelling)
            notes.append(f"global_num_gpus: {value} ({source}) -> num_gpus: {value} (one node)")

    if "peak_theoretical_tflops" in raw:
        value, source, spelling = raw["peak_theoretical_tflops"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"peak_theoretical_tflops: {value!r} in {source} must be a positive number (TFLOP/s).",
                              key="peak_theoretical_tflops", sources=[source])
        if get("peak_flops_per_device") is not None:
            raise _conflict(spelling, source, "peak_flops_per_device", get("peak_flops_per_device")[1],
                            "both set the device peak")
        out["peak_flops_per_device"] = (float(value) * 1e12, source, spelling)
        notes.append(f"peak_theoretical_tflops: {value} ({source}) -> peak_flops_per_device: {float(value) * 1e12:g}")

    if "attention_config" in raw:
        value, source, _ = raw["attention_config"]
        layers = get("num_layers")
        from megatron.neox_args.sections import ModelArgs

        num_layers = layers[0] if layers is not None else ModelArgs.num_layers
        problems = attention_config_problems(value, source, num_layers)
        refusals += [f"{p} ({source})" for p in problems]
        if not problems:
            notes.append(f"attention_config ({source}): every layer global/flash = dense causal attention "
                         f"(scaled_dot_product_attention, which runs a flash kernel where it can)")
    return out, notes, refusals
