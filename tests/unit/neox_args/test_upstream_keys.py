"""GPT-NeoX configs as upstream writes them (the tests write them; nothing is fetched): each class of
upstream file resolves with GPT-NeoX's meaning, or is refused once with every unsupported key listed."""

import io
import json
import textwrap
from contextlib import redirect_stdout

import pytest
from megatron.neox_args import ConfigError, NeoXArgs

LOCAL_SETUP = """
data_path: data/bundled/pystdlib_text_document
tokenizer_type: ByteLevelTokenizer
"""

# the shape of upstream's configs/pythia/*.yml (JSON-style YAML, DeeperSpeed's bf16 spelling, kernel keys)
PYTHIA = """
{
  "pipe_parallel_size": 1, "model_parallel_size": 1,
  "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
  "max_position_embeddings": 32, "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": true,
  "gpt_j_residual": true, "output_layer_parallelism": "column",
  "attention_config": [[["flash"], 2]],
  "scaled_upper_triang_masked_softmax_fusion": true, "bias_gelu_fusion": true,
  "init_method": "small_init", "output_layer_init_method": "wang_init",
  "optimizer": {"type": "Adam", "params": {"lr": 0.00025, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "min_lr": 0.000025,
  "zero_optimization": {"stage": 1, "allgather_partitions": true, "allgather_bucket_size": 500000000,
                        "overlap_comm": true, "reduce_scatter": true, "reduce_bucket_size": 500000000,
                        "contiguous_gradients": true, "cpu_offload": false},
  "fp16": {"enabled": true, "type": "bfloat16", "auto_cast": true, "loss_scale": 0,
           "loss_scale_window": 1000, "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1},
  "fp32_allreduce": true,
  "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4, "data_impl": "mmap",
  "num_workers": 1, "checkpoint_activations": true, "checkpoint_num_layers": 1,
  "partition_activations": true, "synchronize_each_layer": true,
  "gradient_clipping": 1.0, "weight_decay": 0.1, "hidden_dropout": 0, "attention_dropout": 0,
  "train_iters": 1000, "lr_decay_iters": 1000, "distributed_backend": "nccl", "lr_decay_style": "cosine",
  "warmup": 0.01, "checkpoint_factor": 100, "extra_save_iters": [0, 1, 2, 4, 8, 16, 32, 64],
  "eval_interval": 1000, "eval_iters": 10, "log_interval": 10, "steps_per_print": 10,
  "wall_clock_breakdown": true
}
"""

# the shape of upstream's configs/llama2/7B.yml (gated width in the 3x convention, fp16 with "fp16": true)
LLAMA2_7B = """
{
  "pipe_parallel_size": 1, "model_parallel_size": 1, "make_vocab_size_divisible_by": 1,
  "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "seq_length": 4096,
  "max_position_embeddings": 4096, "pos_emb": "rotary", "rotary_pct": 1, "no_weight_tying": true,
  "gpt_j_residual": false, "output_layer_parallelism": "column", "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-5,
  "attention_config": [[["flash"], 32]],
  "scaled_upper_triang_masked_softmax_fusion": true, "bias_gelu_fusion": false,
  "use_bias_in_norms": false, "use_bias_in_attn_linear": false, "use_bias_in_mlp": false,
  "activation": "swiglu", "intermediate_size": 32768, "mlp_multiple_of": 256,
  "optimizer": {"type": "Adam", "params": {"lr": 0.0003, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "fp16": {"fp16": true, "enabled": true, "loss_scale": 0, "loss_scale_window": 1000,
           "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1},
  "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
  "precision": "fp16", "train_iters": 10, "steps_per_print": 10
}
"""


@pytest.fixture
def write(tmp_path):
    def write_file(name, text):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)
    return write_file


def _deepspeed_accepts(config: dict) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(config)  # raises pydantic's ValidationError on a key DeepSpeed rejects


def test_pythia_style_config_resolves_with_upstreams_meaning(write):
    args = NeoXArgs.from_ymls([write("pythia.yml", PYTHIA), write("setup.yml", LOCAL_SETUP)], world_size=1)
    assert args.derived.precision == "bf16"  # fp16 {type: bfloat16} is DeeperSpeed's way to ask for bf16
    assert args.precision.bf16 == {"enabled": True} and args.precision.fp16 == {"enabled": False}
    assert args.precision.communication_data_type == "fp32"  # fp32_allreduce
    assert args.model.bias_gelu_fusion and args.checkpoint.extra_save_iters[:3] == [0, 1, 2]
    assert {"rope_fusion", "steps_per_print", "wall_clock_breakdown"} - set(args.upstream_noops) == {"rope_fusion"}
    ds = args.deepspeed_config()
    _deepspeed_accepts(ds)
    with pytest.raises(Exception, match="loss_scale"):  # what upstream's block would have done
        _deepspeed_accepts({**ds, "bf16": {"enabled": True, "loss_scale": 0}})


def test_llama2_7b_style_config_builds_an_11008_wide_mlp(write):
    args = NeoXArgs.from_ymls([write("7B.yml", LLAMA2_7B), write("setup.yml", LOCAL_SETUP)], world_size=1)
    assert args.derived.intermediate_size == 11008  # not 32768: upstream counts a SwiGLU width 3x
    assert args.derived.precision == "fp16" and "fp16" not in args.precision.fp16
    _deepspeed_accepts(args.deepspeed_config())
    from megatron.launcher.dry_run import parameter_counts

    counts = parameter_counts(args)
    # Llama-2 7B: 32 x (4 h^2 + 3 h x 11008 + 2 h) + h, plus 2 x vocab x h for the untied embedding and head
    h = 4096
    body = 32 * (4 * h * h + 3 * h * 11008 + 2 * h) + h
    assert counts["without_embedding_and_output"] == body
    assert counts["total"] == body + 2 * counts["padded_vocab_size"] * h


def test_every_refused_key_of_every_file_is_listed_once(write):
    a = write("a.yml", PYTHIA.replace('"wall_clock_breakdown": true', '"wall_clock_breakdown": true, '
                                      '"sparsity_config": {"block": 16}, "te_mha": true, "hiden_size": 3'))
    b = write("b.yml", LOCAL_SETUP + 'attention_config_x: 1\nwarmup_iters: 500\nuse_comet: true\n'
                                     'moe_num_experts: 8\n')
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([a, b], world_size=1)
    text = str(err.value)
    for key in ("sparsity_config", "te_mha", "hiden_size", "attention_config_x", "warmup_iters", "use_comet",
                "moe_num_experts"):
        assert f"`{key}`" in text or f"{key}:" in text, key
    assert "7 keys cannot be used" in text and a in text and b in text
    assert "did you mean `hidden_size`" in text and "fraction of lr_decay_iters" in text


@pytest.mark.parametrize("attention_config, phrase", [
    ([[["mamba"], 2]], "Mamba blocks"), ([[["rwkv"], 2]], "RWKV blocks"), ([[["gmlp"], "all"]], "gMLP"),
    ([[["local", "global"], "all"]], "local"), ([[["global"], 3]], "covers 3 layers"),
])
def test_attention_config_architectures_are_refused(minimal, attention_config, phrase):
    with pytest.raises(ConfigError, match=phrase):
        NeoXArgs.from_dict({**minimal, "num_layers": 2, "attention_config": attention_config}, world_size=1)


def test_no_op_key_at_a_value_that_would_matter_is_refused(minimal):
    with pytest.raises(ConfigError, match="only `column` exists"):
        NeoXArgs.from_dict({**minimal, "output_layer_parallelism": "row"}, world_size=1)
    args = NeoXArgs.from_dict({**minimal, "partition_activations": True, "checkpoint_activations": True,
                               "model_parallel_size": 2}, world_size=2)  # implemented: mpu.random.checkpoint
    assert args.training.partition_activations


def test_precision_key_and_conflicts(minimal):
    assert NeoXArgs.from_dict({**minimal, "precision": "bfloat16"}, world_size=1).derived.precision == "bf16"
    assert NeoXArgs.from_dict({**minimal, "precision": "fp16"}, world_size=1).derived.precision == "fp16"
    with pytest.raises(ConfigError, match="disagree"):
        NeoXArgs.from_dict({**minimal, "precision": "fp16", "bf16": {"enabled": True}}, world_size=1)


def test_upstream_defaults_where_a_file_is_silent(minimal):
    args = NeoXArgs.from_dict(minimal, world_size=1)
    m = args.model
    assert (m.pos_emb, m.init_method, m.output_layer_init_method, m.rms_norm_epsilon) == (
        "learned", "normal", "scaled_normal", 1e-8)
    assert (args.lr.lr_decay_style, args.training.eval_iters, args.logging.log_interval) == ("linear", 100, 100)
    assert (args.optimizer.betas, args.optimizer.weight_decay) == ((0.9, 0.999), 0.1)
    minimal.pop("lr")
    with pytest.raises(ConfigError, match="lr is required"):
        NeoXArgs.from_dict(minimal, world_size=1)
    minimal.pop("tokenizer_type")
    with pytest.raises(ConfigError, match="GPT2BPETokenizer .GPT-NeoX's default tokenizer. needs vocab_file"):
        NeoXArgs.from_dict({**minimal, "lr": 1e-3}, world_size=1)


def test_deepspeed_extra_args_and_comment(minimal):
    args = NeoXArgs.from_dict({**minimal, "deepspeed_extra_args": {"comms_logger": {"enabled": True}}},
                              world_size=1)
    assert args.deepspeed_config()["comms_logger"] == {"enabled": True}
    _deepspeed_accepts(args.deepspeed_config())
    with pytest.raises(ConfigError, match="writes into the DeepSpeed config itself"):
        NeoXArgs.from_dict({**minimal, "deepspeed_extra_args": {"bf16": {"enabled": True}}}, world_size=1)
    with pytest.raises(ConfigError, match="launcher: slurm"):
        NeoXArgs.from_dict({**minimal, "comment": "neox"}, world_size=1)
    from megatron.launcher.command import runner_command

    slurm = NeoXArgs.from_dict({**minimal, "comment": "neox", "launcher": "slurm", "hostfile": "/dev/null"},
                               world_size=1)
    argv = runner_command(slurm.launcher, "train.py", "X", cuda_available=False)
    assert argv[argv.index("--launcher_args") + 1] == "--comment neox"


def test_extra_save_iters_rule():
    from megatron.neox_args.sections import CheckpointArgs
    from megatron.training.trainer import save_due

    ckpt = CheckpointArgs(save="x", checkpoint_factor=100, extra_save_iters=[0, 1, 2, 4])
    assert [i for i in range(0, 301) if save_due(ckpt, i)] == [0, 1, 2, 4, 100, 200, 300]
    assert not save_due(CheckpointArgs(save=None, extra_save_iters=[0]), 0)


def test_dry_run_shows_parameter_count_and_deepspeed_config(write):
    from megatron.launcher.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        status = main(["train.py", write("pythia.yml", PYTHIA), write("setup.yml", LOCAL_SETUP), "--dry-run"],
                      environ={})
    text = out.getvalue()
    assert status == 0
    args = NeoXArgs.from_ymls([write("p2.yml", PYTHIA), write("s2.yml", LOCAL_SETUP)], world_size=1)
    from megatron.launcher.dry_run import parameter_counts

    counts = parameter_counts(args)
    assert f"# parameters: {counts['total']:,} total, {counts['without_embedding_and_output']:,} without" in text
    block = text.split("# DeepSpeed config passed to deepspeed.initialize", 1)[1].split("\n", 1)[1]
    ds_lines = []
    for line in block.splitlines():
        if not line.startswith("#   "):
            break
        ds_lines.append(line[4:])
    assert json.loads("\n".join(ds_lines)) == args.deepspeed_config()
    assert "GPT-NeoX key accepted, no effect here: rope_fusion" not in text
    assert "GPT-NeoX key accepted, no effect here: synchronize_each_layer" in text


def test_optimizer_type_is_case_insensitive_as_upstream(minimal):
    minimal.pop("lr")
    args = NeoXArgs.from_dict({**minimal, "optimizer": {"type": "adam", "params": {"lr": 1e-3}}}, world_size=1)
    assert args.optimizer.optimizer_type == "Adam"


def test_global_num_gpus_is_the_world_size(minimal, tmp_path):
    assert NeoXArgs.from_dict({**minimal, "global_num_gpus": 2}).launcher.num_gpus == 2
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=4\nnode2 slots=4\n")
    args = NeoXArgs.from_dict({**minimal, "global_num_gpus": 8, "hostfile": str(hostfile)})
    assert args.derived.world_size == 8
    with pytest.raises(ConfigError, match="global_num_gpus: 4 .* give 8 ranks"):
        NeoXArgs.from_dict({**minimal, "global_num_gpus": 4, "hostfile": str(hostfile)})


def test_peak_theoretical_tflops_and_fp16_cross_entropy(minimal):
    args = NeoXArgs.from_dict({**minimal, "peak_theoretical_tflops": 989.0, "attention_softmax_in_fp32": True})
    assert args.logging.peak_flops_per_device == 989e12
    with pytest.raises(ConfigError, match="always runs in fp32"):
        NeoXArgs.from_dict({**minimal, "fp16_lm_cross_entropy": True})
