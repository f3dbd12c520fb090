"""The checkpoint converters end to end: HF dir -> our checkpoint -> HF dir, logits equal throughout."""

import importlib.util
import os

import pytest
import torch
import transformers
import yaml

from megatron.checkpointing import read_model_state
from megatron.model import GPTModel
from megatron.mpu.initialize import ParallelState
from megatron.neox_args import SECTIONS, DerivedArgs, ModelArgs, NeoXArgs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ATOL = 1e-5


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "ckpts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_hf(family):
    torch.manual_seed(0)
    if family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, use_parallel_residual=True, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        )
        model = transformers.GPTNeoXForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # biases and norm weights random too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _logits_hf(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_hf_to_neox_to_hf(tmp_path, family):
    hf_model = _tiny_hf(family)
    hf_model.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = _logits_hf(hf_model, tokens)

    _load_tool("convert_hf_to_neox").main(
        ["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"), "--config-out", str(tmp_path / "m.yml")]
    )
    state_dict, args = read_model_state(str(tmp_path / "ours"))
    assert args.derived.padded_vocab_size == 128
    ours = GPTModel(args.model, args.derived, ParallelState.single()).eval()
    ours.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= ATOL

    written = yaml.safe_load((tmp_path / "m.yml").read_text())
    assert ModelArgs(**written) == args.model  # the YAML is exactly the model section

    _load_tool("convert_neox_to_hf").main(["--load", str(tmp_path / "ours"), "--output", str(tmp_path / "hf2")])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert type(back) is type(hf_model)
    assert (_logits_hf(back, tokens) - expected).abs().max().item() <= ATOL
    for key, value in hf_model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_tensor_parallel_checkpoint_is_merged(tmp_path):
    """A model_parallel_size 2 checkpoint converts directly (its shards merged in memory) to the HF model of
    the TP=1 weights; a missing rank file is a clear error."""
    from megatron.checkpointing.layout import write_latest
    from megatron.checkpointing.reshard import split_tp

    sections = {name: cls() for name, cls in SECTIONS.items()}
    sections["parallel"].model_parallel_size = 2
    sections["model"].pos_emb = "rotary"
    args = NeoXArgs(**sections, derived=DerivedArgs(num_kv_heads=4, intermediate_size=512,
                                                    max_position_embeddings=128, padded_vocab_size=256))
    torch.manual_seed(0)
    ours = GPTModel(args.model, args.derived, ParallelState.single()).eval()
    tag_dir = tmp_path / "global_step5"
    tag_dir.mkdir()
    for rank, shard in enumerate(split_tp(ours.state_dict(), args.model, args.derived, 2)):
        torch.save({"module": shard}, tag_dir / f"mp_rank_{rank:02d}_model_states.pt")
    (tag_dir / "neox_args.json").write_text(args.serialize())
    (tag_dir / "complete").write_text("")
    write_latest(str(tmp_path), "global_step5")
    _load_tool("convert_neox_to_hf").main(["--load", str(tmp_path), "--output", str(tmp_path / "hf")])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (_logits_hf(hf_model, tokens) - ours(tokens)).abs().max().item() <= ATOL

    (tag_dir / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(SystemExit, match="mp_rank_01_model_states.pt is missing"):
        _load_tool("convert_neox_to_hf").main(["--load", str(tmp_path), "--output", str(tmp_path / "hf2")])


@pytest.mark.parametrize("family, tp, pp", [("gpt_neox", 2, 2), ("llama", 1, 2), ("llama", 2, 1)])
def test_hf_to_neox_writes_any_tp_x_pp(tmp_path, family, tp, pp):
    """convert_hf_to_neox.py --model-parallel-size/--pipe-parallel-size writes the layout asked for (pipeline:
    one file per layer spec and tensor rank, DeepSpeed's names); merged back, it is the TP=1 conversion bit for
    bit, and converting it to HF again gives the original logits."""
    from megatron.checkpointing.reshard import read_merged_model_state

    hf_model = _tiny_hf(family)
    hf_model.save_pretrained(tmp_path / "hf")
    convert = _load_tool("convert_hf_to_neox").main
    convert(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "tp1"), "--config-out", str(tmp_path / "a.yml")])
    convert(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "split"), "--config-out", str(tmp_path / "b.yml"),
             "--model-parallel-size", str(tp), "--pipe-parallel-size", str(pp)])
    files = sorted(os.listdir(tmp_path / "split" / "global_step0"))
    if pp > 1:
        num_layers = 2
        specs = num_layers + 2 + (0 if family == "llama" else 1)  # tied (llama here): no head file
        assert sum(name.startswith("layer_") for name in files) == specs * tp
        assert f"layer_00-model_{tp - 1:02d}-model_states.pt" in files
        assert f"mp_rank_{tp * pp - 1:02d}_model_states.pt" in files
    else:
        assert f"mp_rank_{tp - 1:02d}_model_states.pt" in files
    assert "weights_only" in files
    full, args = read_merged_model_state(str(tmp_path / "split"))
    reference, _ = read_model_state(str(tmp_path / "tp1"))
    assert (args.parallel.model_parallel_size, args.parallel.pipe_parallel_size) == (tp, pp)
    assert sorted(full) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(full[key], value), key
    _load_tool("convert_neox_to_hf").main(["--load", str(tmp_path / "split"), "--output", str(tmp_path / "hf2")])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    assert (_logits_hf(back, tokens) - _logits_hf(hf_model, tokens)).abs().max().item() <= ATOL
