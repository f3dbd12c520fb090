"""convert_neox_to_hf.py with GPT-NeoX's flags: --input_dir/--output_dir/--config_file/--precision/
--architecture neox|llama|mistral/--no_save_tokenizer, the tokenizer saved beside the model with its ids in
config.json, the legacy rotary fields transformers 4.4x reads, and a GPT-NeoX checkpoint converted directly."""

import json
import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from megatron.checkpointing import read_model_state
from megatron.neox_args import NeoXArgs
from tests.parity.test_convert_ckpts import _load_tool, _logits_hf, _tiny_hf

ATOL = 1e-5


def _tokenizer_json(path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<|endoftext|>", "<unk>", "<|padding|>"])
    tok.train_from_iterator(["the model reads tokens from documents and learns to predict the next one"] * 20,
                            trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture
def llama_checkpoint(tmp_path):
    hf_model = _tiny_hf("llama")
    hf_model.save_pretrained(tmp_path / "hf")
    _load_tool("convert_hf_to_neox").main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"),
                                           "--config-out", str(tmp_path / "m.yml")])
    _, args = read_model_state(str(tmp_path / "ours"))  # give the run a tokenizer, as a training run has
    args.tokenizer.tokenizer_type = "HFTokenizer"
    args.tokenizer.vocab_file = _tokenizer_json(tmp_path / "tokenizer.json")
    tag = tmp_path / "ours" / "global_step0"
    (tag / "neox_args.json").write_text(args.serialize())
    return hf_model, tag


def test_upstream_flags_tokenizer_and_legacy_rope_fields(tmp_path, llama_checkpoint):
    hf_model, tag = llama_checkpoint
    convert = _load_tool("convert_neox_to_hf").main
    convert(["--input_dir", str(tag), "--output_dir", str(tmp_path / "out"), "--precision", "bf16",
             "--architecture", "llama"])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back) is transformers.LlamaForCausalLM and back.dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    eod = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.encode("the model", add_special_tokens=False) == \
        Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("the model").ids
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == eod
    assert config["rope_theta"] == 500000.0  # transformers 4.4x's spelling, beside rope_parameters
    assert config["rope_parameters"]["rope_theta"] == 500000.0

    convert(["--input_dir", str(tag), "--output_dir", str(tmp_path / "mistral"), "--architecture", "mistral",
             "--no_save_tokenizer"])
    mistral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mistral").eval()
    assert type(mistral) is transformers.MistralForCausalLM
    assert not os.path.exists(tmp_path / "mistral" / "tokenizer.json")
    mistral_config = json.loads((tmp_path / "mistral" / "config.json").read_text())
    assert mistral_config["eos_token_id"] == mistral_config["bos_token_id"] == eod  # from our tokenizer still
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (_logits_hf(mistral, tokens) - _logits_hf(hf_model, tokens)).abs().max().item() <= ATOL

    with pytest.raises(SystemExit, match="--architecture neox: this model is an HF llama model"):
        convert(["--input_dir", str(tag), "--output_dir", str(tmp_path / "bad"), "--architecture", "neox"])


def test_gpt_neox_checkpoint_converts_directly(tmp_path):
    from tests.parity.test_import_neox_checkpoint import PYTHIA_YAML, _ours, _to_upstream, _write_upstream

    args, model, yaml_path = _ours(PYTHIA_YAML.replace('"pos_emb": "learned"', '"pos_emb": "rotary"'), tmp_path)
    tag = _write_upstream(_to_upstream(model.state_dict(), args, tp=2), tmp_path / "neox", "pipeline")
    _load_tool("convert_neox_to_hf").main(["--input_dir", str(tag), "--config_file", yaml_path, "--output_dir",
                                           str(tmp_path / "hf"), "--architecture", "neox"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["hidden_act"] == "gelu_new"  # bias_gelu_fusion: true
    assert (config["rotary_pct"], config["rotary_emb_base"]) == (1.0, 10000)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (_logits_hf(hf, tokens) - model(tokens)).abs().max().item() <= ATOL
