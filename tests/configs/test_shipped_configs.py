"""Every file in configs/ loads and validates: size files together with local_setup.yml, the others alone.

world_size is given explicitly (the tensor-parallel size, or 1) so the test needs no GPU.
"""

from pathlib import Path

import pytest

from megatron.neox_args import NeoXArgs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STANDALONE = {"tiny.yml"}
SETUP = "local_setup.yml"
SIZE_FILES = sorted(p.name for p in CONFIGS.glob("*.yml") if p.name not in STANDALONE | {SETUP})


def _load(*names: str, world_size: int = 1) -> NeoXArgs:
    return NeoXArgs.from_ymls([str(CONFIGS / name) for name in names], world_size=world_size)


def test_the_expected_files_ship():
    assert {"125M.yml", "410M.yml", "1-3B.yml", "6-9B.yml", "llama-1B.yml"} <= set(SIZE_FILES)
    assert (CONFIGS / SETUP).is_file() and (CONFIGS / "tiny.yml").is_file()


@pytest.mark.parametrize("name", SIZE_FILES)
def test_size_file_with_local_setup_validates(name):
    plain = NeoXArgs.from_ymls([str(CONFIGS / name), str(CONFIGS / SETUP)], world_size=8)
    tp = plain.parallel.model_parallel_size
    args = _load(name, SETUP, world_size=tp)
    assert args.derived.data_parallel_size == 1
    assert args.data.data_path == "data/bundled/pystdlib_text_document"
    assert args.deepspeed_config()["train_batch_size"] == args.derived.train_batch_size
    args.set_vocab_size(257)
    assert args.derived.padded_vocab_size % (args.model.make_vocab_size_divisible_by * tp) == 0


@pytest.mark.parametrize("name", SIZE_FILES)
def test_size_files_set_no_paths(name):
    text = (CONFIGS / name).read_text()
    for key in ("data_path", "train_data_paths", "save:", "load:", "log_dir", "vocab_file", "tokenizer_type"):
        assert key not in text, f"{name} sets {key}; paths belong in local_setup.yml"


def test_tiny_is_the_small_cpu_default():
    args = _load("tiny.yml")
    m = args.model
    args.set_vocab_size(257)
    h, L, V = m.hidden_size, m.num_layers, args.derived.padded_vocab_size
    params = L * (4 * h * h + 2 * h * args.derived.intermediate_size) + V * h  # weights only, tied
    assert 2e6 <= params <= 4e6
    assert args.derived.precision == "fp32" and args.parallel.zero_optimization["stage"] == 0
    assert args.launcher.num_gpus == 1 and args.derived.world_size == 1
    assert args.checkpoint.save == "checkpoints/tiny" and args.checkpoint.checkpoint_factor == 100
    assert args.tokenizer.tokenizer_type == "ByteLevelTokenizer"
    assert (args.optimizer.lr, args.lr.warmup, args.lr.lr_decay_style) == (1e-3, 0.05, "cosine")


def test_tiny_world_size_is_computed_without_a_gpu():
    args = NeoXArgs.from_ymls([str(CONFIGS / "tiny.yml")])
    assert args.derived.world_size == 1 and args.derived.train_batch_size == 8


def test_specific_shapes():
    llama = _load("llama-1B.yml", SETUP)
    assert (llama.model.norm, llama.model.activation, llama.model.num_kv_heads, llama.derived.intermediate_size,
            llama.model.rotary_emb_base, llama.model.use_bias_in_mlp) == ("rmsnorm", "swiglu", 8, 8192, 500000, False)
    pythia = _load("410M.yml", SETUP)
    assert (pythia.model.rotary_pct, pythia.model.gpt_j_residual, pythia.model.no_weight_tying,
            pythia.derived.precision, pythia.parallel.zero_optimization["stage"]) == (0.25, True, True, "bf16", 1)


@pytest.mark.parametrize("name", SIZE_FILES)
def test_bf16_size_files_accumulate_gradients_in_fp32(name):
    """Every bf16 size file uses fp32 gradient accumulation, and a ZeRO stage where DeepSpeed implements it."""
    from megatron.engine import deepspeed_optimizer_kind

    args = _load(name, SETUP, world_size=8)
    if args.derived.precision == "bf16":
        assert args.deepspeed_config()["data_types"] == {"grad_accum_dtype": "fp32"}
        assert deepspeed_optimizer_kind(args).wrapper == "BF16_Optimizer"


LONG_SEQ = sorted(p.name for p in (CONFIGS / "long_seq").glob("*.yml"))
H200_DEVICE_GIB, HOST_GIB = 139.0, 125.0  # one H200; a 128 GiB host (MemAvailable)


def test_the_long_sequence_configs_ship():
    assert {"1-3B-128k.yml", "1-3B-512k.yml", "6-9B-128k.yml", "6-9B-128k-tp8.yml", "13B-256k-tp8.yml"} <= set(LONG_SEQ)


@pytest.mark.parametrize("name", LONG_SEQ)
def test_long_sequence_configs_validate_and_fit_an_h200(name):
    """Each validates with local_setup.yml on its tensor-parallel world size, and its memory estimate fits
    one H200 and a 128 GiB host (all ranks of the node)."""
    from megatron.training.memory_estimate import GIB, check_memory, estimate_memory

    plain = NeoXArgs.from_ymls([str(CONFIGS / "long_seq" / name), str(CONFIGS / SETUP)], world_size=8)
    tp = plain.parallel.model_parallel_size
    args = NeoXArgs.from_ymls([str(CONFIGS / "long_seq" / name), str(CONFIGS / SETUP)], world_size=tp)
    assert args.model.seq_length >= 131072 and args.model.max_position_embeddings == args.model.seq_length
    assert args.model.attention_impl == "fa4" and args.derived.precision == "bf16"
    assert args.training.checkpoint_activations
    if tp > 1:
        assert args.parallel.sequence_parallel and tp == 8
    args.set_vocab_size(50277)
    est = estimate_memory(args)
    check_memory(args, est, device_free=H200_DEVICE_GIB * GIB, host_available=HOST_GIB * GIB, ranks_per_host=tp)
