"""Consistency checks that must fail before launch, each with the keys, values and fix in the message."""

import pytest

from megatron.neox_args import ConfigError, NeoXArgs

CASES = [
    # (overrides, world_size, phrases that must all be in the message)
    ({"hidden_size": 250, "num_attention_heads": 4}, 1,
     ["hidden_size: 250", "num_attention_heads: 4", "multiple of 4"]),
    ({"num_attention_heads": 4, "num_kv_heads": 3}, 1, ["num_kv_heads: 3", "num_attention_heads: 4"]),
    ({"seq_length": 256, "max_position_embeddings": 128}, 1,
     ["seq_length: 256", "max_position_embeddings: 128", "at least 256"]),
    ({"rotary_pct": 0.0}, 1, ["rotary_pct: 0.0", "(0, 1]"]),
    ({"rotary_pct": 1.5}, 1, ["rotary_pct: 1.5", "(0, 1]"]),
    ({"hidden_size": 24, "num_attention_heads": 4, "rotary_pct": 0.5, "pos_emb": "rotary"}, 1,
     ["3 rotary dimensions", "even"]),
    ({"pipe_parallel_size": 4, "num_layers": 3}, 4,
     ["num_layers: 3 is less than pipe_parallel_size: 4", "at most 3", "at least 4"]),
    ({"pipe_parallel_size": 2, "num_layers": 2, "zero_optimization": {"stage": 2}}, 2,
     ["zero_optimization.stage: 2 with pipe_parallel_size: 2", "does not support ZeRO stage 2 or 3",
      "zero_optimization.stage: 1 (or 0)"]),
    ({"pipe_parallel_size": 2, "num_layers": 2, "zero_optimization": {"stage": 3}}, 2,
     ["zero_optimization.stage: 3 with pipe_parallel_size: 2"]),
    ({"pipe_parallel_size": 2, "model_parallel_size": 2, "num_layers": 2}, 6,
     ["world_size 6", "model_parallel_size 2 x pipe_parallel_size 2 = 4", "dp = 6 / (2 x 2) = 1.5"]),
    ({"pipe_partition_method": "type:attention"}, 1, ["pipe_partition_method", "type:transformer"]),
    ({"model_parallel_size": 2}, 3, ["world_size 3", "model_parallel_size 2"]),
    ({"model_parallel_size": 8, "hidden_size": 384, "num_attention_heads": 12}, 8,
     ["num_attention_heads: 12", "model_parallel_size: 8"]),
    ({"model_parallel_size": 4, "num_attention_heads": 8, "num_kv_heads": 2, "hidden_size": 256}, 4,
     ["num_kv_heads: 2", "model_parallel_size: 4"]),
    ({"model_parallel_size": 2, "intermediate_size": 333}, 2, ["intermediate_size: 333", "model_parallel_size: 2"]),
    ({"sequence_parallel": True}, 1, ["sequence_parallel: true needs model_parallel_size > 1"]),
    ({"sequence_parallel": True, "model_parallel_size": 2, "seq_length": 127}, 2,
     ["seq_length: 127", "model_parallel_size: 2"]),
    ({"checkpoint_factor": 0}, 1, ["checkpoint_factor: 0", "positive"]),
    ({"keep_last_n_checkpoints": 0}, 1, ["keep_last_n_checkpoints: 0"]),
    ({"lr": 1e-4, "min_lr": 1e-3}, 1, ["lr: 0.0001", "min_lr: 0.001"]),
    ({"warmup": 1.5}, 1, ["warmup: 1.5", "[0, 1]"]),
    ({"split": "90,10"}, 1, ["split: '90,10'", "3 comma-separated"]),
    ({"split": "90,-1,10"}, 1, ["split"]),
    ({"split": "0,0,0"}, 1, ["split"]),
    ({"split": "a,b,c"}, 1, ["split"]),
    ({"zero_optimization": {"stage": 4}}, 1, ["zero_optimization.stage: 4", "0, 1, 2 or 3"]),
    ({"zero_optimization": {"stage": True}}, 1, ["zero_optimization.stage: True"]),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, 1, ["bf16 and fp16 are both enabled", "choose one"]),
    ({"bf16": {"enabled": "yes"}}, 1, ["bf16.enabled: 'yes'"]),
    ({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}, 1,
     ["data_types.grad_accum_dtype: fp32 with bf16 weights needs ZeRO stage >= 1", "zero_optimization.stage: 1"]),
    ({"data_types": {"grad_accum_dtype": "fp64"}}, 1, ["data_types.grad_accum_dtype: 'fp64'", "fp32, bf16, fp16"]),
    ({"data_types": {"grad_acc_dtype": "fp32"}}, 1, ["data_types: unknown key(s) ['grad_acc_dtype']"]),
    ({"data_types": {"grad_accum_dtype": "bf16"}, "zero_optimization": {"stage": 1}}, 1,
     ["grad_accum_dtype: bf16 with fp32 weights"]),
    ({"free_grad_sums_between_steps": True}, 1,
     ["free_grad_sums_between_steps: true", "this config gets torch optimizer", "grad_accum_dtype: fp32"]),
    ({"free_grad_sums_between_steps": True, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
      "data_types": {"grad_accum_dtype": "fp32"}}, 1, ["this config gets DeepSpeedZeroOptimizer", "ZeRO stage 2"]),
    ({"free_grad_sums_between_steps": True, "bf16": {"enabled": True, "immediate_grad_update": True},
      "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}, 1,
     ["with bf16.immediate_grad_update", "drop one of the two"]),
    ({"fused_optimizer_step": True}, 1,
     ["fused_optimizer_step: true", "fuses the AdamW step", "this config gets torch optimizer", "grad_accum_dtype: fp32"]),
    ({"torch_compile_mode": "reduce-overhead", "torch_compile": False}, 1,
     ["torch_compile_mode: reduce-overhead with torch_compile: false", "set torch_compile: true"]),
    ({"torch_compile_mode": "reduce-overhead", "checkpoint_activations": True}, 1,
     ["torch_compile_mode: reduce-overhead", "checkpoint_activations: true", "torch_compile_mode: default"]),
    ({"torch_compile_mode": "max-autotune", "recompute_modules": ["core_attn"]}, 1,
     ["torch_compile_mode: max-autotune", "recompute_modules: ['core_attn']"]),
    ({"torch_compile_mode": "reduce-overhead", "pipe_parallel_size": 2, "num_layers": 2,
      "checkpoint_activations": True}, 2,
     ["pipe_parallel_size: 2", "checkpoint_activations: true"]),
    ({"torch_compile_mode": "fast"}, 1, ["torch_compile_mode", "fast"]),
    ({"betas": [0.9]}, 1, ["betas: [0.9]", "two numbers"]),
    ({"hidden_dropout": 1.0}, 1, ["hidden_dropout: 1.0"]),
    ({"num_layers": 0}, 1, ["num_layers: 0", "positive integer"]),
    ({"gradient_clipping": -1.0}, 1, ["gradient_clipping: -1.0", "negative"]),
    ({"num_nodes": 0}, 1, ["num_nodes: 0"]),
    ({"tokenizer_type": "HFTokenizer"}, 1, ["HFTokenizer needs vocab_file"]),
    ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "v.json"}, 1, ["GPT2BPETokenizer needs merge_file"]),
    ({"vocab_file": "v.json"}, 1, ["vocab_file: 'v.json' is set but tokenizer_type ByteLevelTokenizer"]),
]


@pytest.mark.parametrize("overrides, world_size, phrases", CASES)
def test_consistency_errors(minimal, overrides, world_size, phrases):
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_dict({**minimal, **overrides}, source="cfg.yml", world_size=world_size)
    message = str(err.value)
    for phrase in phrases:
        assert phrase in message, message
    assert "cfg.yml" in message or "default" in message
    assert "\n" not in message


def test_error_names_the_file_of_each_key(write_yaml):
    a = write_yaml("a.yml", "data_path: data/bundled/x\ntrain_micro_batch_size_per_gpu: 1\nhidden_size: 250\n")
    b = write_yaml("b.yml", "num_attention_heads: 4\n")
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([a, b], world_size=1)
    assert f"hidden_size from {a}" in str(err.value) and f"num_attention_heads from {b}" in str(err.value)


def test_grad_accum_dtype_reaches_the_deepspeed_config_only_when_set(minimal):
    plain = NeoXArgs.from_dict({**minimal, "bf16": {"enabled": True}}, world_size=1)
    assert "data_types" not in plain.deepspeed_config()
    fp32_accum = NeoXArgs.from_dict({**minimal, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                                     "data_types": {"grad_accum_dtype": "fp32"}}, world_size=1)
    assert fp32_accum.deepspeed_config()["data_types"] == {"grad_accum_dtype": "fp32"}


def test_free_grad_sums_between_steps_is_accepted_with_bf16_optimizer(minimal):
    args = NeoXArgs.from_dict({**minimal, "free_grad_sums_between_steps": True, "bf16": {"enabled": True},
                               "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}},
                              world_size=1)
    assert args.precision.free_grad_sums_between_steps
    assert "free_grad_sums_between_steps" not in args.deepspeed_config()  # ours, not DeepSpeed's


def test_valid_edge_cases(minimal):
    NeoXArgs.from_dict({**minimal, "pipe_parallel_size": 1, "rotary_pct": 1.0, "warmup": 0.0}, world_size=1)
    NeoXArgs.from_dict({**minimal, "pipe_parallel_size": 0, "warmup": 1.0, "pos_emb": "learned",
                        "rotary_pct": 0.01}, world_size=1)  # rotary_pct is not used without rotary
    args = NeoXArgs.from_dict({**minimal, "model_parallel_size": 2, "sequence_parallel": True,
                               "num_kv_heads": 2}, world_size=4)
    assert args.derived.data_parallel_size == 2


def test_flash_attention_is_not_a_config_error(minimal):
    args = NeoXArgs.from_dict({**minimal, "attention_impl": "flash"}, world_size=1)
    assert args.model.attention_impl == "flash"


# --- data -------------------------------------------------------------------------------------------------

def _prefix(tmp_path, name):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"{name}{suffix}").write_bytes(b"")
    return str(tmp_path / name)


def test_data_path_and_train_data_paths_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="both set.*choose one"):
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "data_path": "data/bundled/a",
                            "train_data_paths": ["data/bundled/b"]}, world_size=1)
    with pytest.raises(ConfigError, match="no training data"):
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1}, world_size=1)


def test_missing_data_files_name_key_and_path(tmp_path):
    prefix = str(tmp_path / "corpus")
    with pytest.raises(ConfigError, match=rf"data_path: data file {prefix}\.bin does not exist"):
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "data_path": prefix}, world_size=1)
    (tmp_path / "corpus.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"corpus\.idx does not exist"):
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "data_path": prefix}, world_size=1)
    good = _prefix(tmp_path, "good")
    with pytest.raises(ConfigError, match=rf"train_data_paths: data file {prefix}\.idx"):
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "train_data_paths": [good, prefix]},
                           world_size=1)


def test_blended_paths_and_weights(tmp_path):
    a, b = _prefix(tmp_path, "a"), _prefix(tmp_path, "b")
    base = {"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "train_data_paths": [a, b], "valid_data_paths": [a]}
    args = NeoXArgs.from_dict({**base, "train_data_weights": [0.3, 0.7]}, world_size=1)
    assert args.data.train_data_paths == [a, b]
    with pytest.raises(ConfigError, match="train_data_weights has 1 entries but train_data_paths has 2"):
        NeoXArgs.from_dict({**base, "train_data_weights": [1.0]}, world_size=1)
    with pytest.raises(ConfigError, match="test_data_weights is set but test_data_paths is not"):
        NeoXArgs.from_dict({**base, "test_data_weights": [1.0]}, world_size=1)
    with pytest.raises(ConfigError, match="non-negative"):
        NeoXArgs.from_dict({**base, "train_data_weights": [1.0, -1.0]}, world_size=1)
    with pytest.raises(ConfigError, match="valid_data_paths is set together with data_path"):
        NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "data_path": "data/bundled/x",
                            "valid_data_paths": [a]}, world_size=1)


def test_tokenizer_files_must_exist(minimal, tmp_path):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{}")
    with pytest.raises(ConfigError, match=rf"merge_file: tokenizer file {merges} does not exist"):
        NeoXArgs.from_dict({**minimal, "tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(vocab),
                            "merge_file": str(merges)}, world_size=1)
    merges.write_text("")
    args = NeoXArgs.from_dict({**minimal, "tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(vocab),
                               "merge_file": str(merges)}, world_size=1)
    assert args.tokenizer.merge_file == str(merges)


def test_bundled_prefix_is_not_checked_on_disk_in_any_spelling():
    args = NeoXArgs.from_dict({"lr": 6.0e-4, "tokenizer_type": "ByteLevelTokenizer", "train_micro_batch_size_per_gpu": 1, "data_path": "./data/bundled/nothing_here"},
                              world_size=1)
    assert args.data.data_path == "./data/bundled/nothing_here"


def test_sources_are_grouped_in_messages(minimal):
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_dict({**minimal, "train_batch_size": 7}, source="x.yml", world_size=1)
    assert "(train_batch_size, train_micro_batch_size_per_gpu from x.yml; gradient_accumulation_steps from " \
           "default)" in str(err.value)


def test_communication_data_type_reaches_the_deepspeed_config_only_when_set(minimal):
    plain = NeoXArgs.from_dict(minimal, source="cfg.yml", world_size=1)
    assert "communication_data_type" not in plain.deepspeed_config()
    fp32 = NeoXArgs.from_dict({**minimal, "communication_data_type": "fp32"}, source="cfg.yml", world_size=1)
    assert fp32.deepspeed_config()["communication_data_type"] == "fp32"
    with pytest.raises(ConfigError, match="communication_data_type"):
        NeoXArgs.from_dict({**minimal, "communication_data_type": "fp64"}, source="cfg.yml", world_size=1)
