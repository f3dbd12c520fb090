"""A checkpoint in GPT-NeoX's own layout (written here from upstream's key names and shard shapes, for both of
its DeepSpeed layouts, at upstream TP=2) is imported at TP=1 and TP=2 into exactly our model's weights, and
the imported model computes the same logits."""

import os
import sys
import textwrap

import pytest
import torch

from megatron.checkpointing.reshard import read_merged_model_state
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.neox_args import NeoXArgs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "ckpts"))

import import_neox_checkpoint  # noqa: E402

LLAMA_YAML = """
{
  "pipe_parallel_size": 1, "model_parallel_size": 2, "num_layers": 2, "hidden_size": 64,
  "num_attention_heads": 8, "num_kv_heads": 4, "seq_length": 32, "max_position_embeddings": 32,
  "pos_emb": "rotary", "no_weight_tying": true, "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-5,
  "activation": "swiglu", "intermediate_size": 384, "mlp_multiple_of": 32, "use_bias_in_norms": false,
  "use_bias_in_attn_linear": false, "use_bias_in_mlp": false, "make_vocab_size_divisible_by": 64,
  "attention_config": [[["flash"], 2]], "scaled_upper_triang_masked_softmax_fusion": true,
  "optimizer": {"type": "Adam", "params": {"lr": 0.0003}}, "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 2, "tokenizer_type": "HFTokenizer", "vocab_file": "/not/here/tokenizer.json",
  "train_data_paths": ["/not/here/data_text_document"]
}
"""
PYTHIA_YAML = """
{
  "pipe_parallel_size": 0, "model_parallel_size": 2, "num_layers": 2, "hidden_size": 64,
  "num_attention_heads": 4, "seq_length": 32, "max_position_embeddings": 32, "pos_emb": "learned",
  "gpt_j_residual": true, "bias_gelu_fusion": true, "make_vocab_size_divisible_by": 64,
  "optimizer": {"type": "Adam", "params": {"lr": 0.0003}}, "train_micro_batch_size_per_gpu": 4
}
"""
VOCAB_ROWS = 256  # upstream's padded vocabulary (64 x 2 ranks x 2)


def _ours(yaml_text, tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text(textwrap.dedent(yaml_text))
    args = NeoXArgs._build(import_neox_checkpoint.upstream_settings([str(path)]), 1, check_files=False)
    args.set_vocab_size(VOCAB_ROWS)
    torch.manual_seed(0)
    model = GPTModel(args.model, args.derived, ParallelState.single()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return args, model, str(path)


def _to_upstream(state, args, tp):
    """Our full state dict -> upstream's per-rank layer dicts [rank][embedding, layers..., norm, (final_linear)].
    Written from upstream's names and layouts (see megatron/checkpointing/neox_import.py's docstring)."""
    m = args.model
    heads, kv = m.num_attention_heads, args.derived.num_kv_heads
    hn, group = m.hidden_size // heads, heads // kv
    rms = m.norm == "rmsnorm"
    ranks = [[] for _ in range(tp)]

    def norm(ours, up):
        d = {f"{up}.scale" if rms else f"{up}.weight": state[f"{ours}.weight"]}
        if f"{ours}.bias" in state:
            d[f"{up}.bias"] = state[f"{ours}.bias"]
        return d

    for r in range(tp):
        emb = {"word_embeddings.weight": state["embedding.word_embeddings.weight"].chunk(tp)[r].clone()}
        if "embedding.position_embeddings.weight" in state:
            emb["position_embeddings.weight"] = state["embedding.position_embeddings.weight"]
        ranks[r].append(emb)
    for i in range(m.num_layers):
        p = f"layers.{i}"
        qkv = {}
        for kind in ("weight", "bias"):
            key = f"{p}.attention.linear_qkv.{kind}"
            if key not in state:
                continue
            t = state[key].reshape(kv, group + 2, hn, *state[key].shape[1:])
            q = t[:, :group].reshape(heads, hn, *t.shape[3:])
            k, v = t[:, group], t[:, group + 1]
            per = []
            for r in range(tp):
                qr, kr, vr = q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]
                if kv == heads:
                    per.append(torch.stack([qr, kr, vr], 1).reshape(-1, *qr.shape[2:]))
                else:
                    per.append(torch.cat([qr.reshape(-1, *qr.shape[2:]), kr.reshape(-1, *kr.shape[2:]),
                                          vr.reshape(-1, *vr.shape[2:])]))
            qkv[kind] = per
        for r in range(tp):
            layer = {**norm(f"{p}.input_norm", "input_layernorm"),
                     **norm(f"{p}.post_attention_norm", "post_attention_layernorm")}
            for kind, per in qkv.items():
                layer[f"attention.query_key_value.{kind}"] = per[r].clone()
            layer["attention.dense.weight"] = state[f"{p}.attention.linear_proj.weight"].chunk(tp, 1)[r].clone()
            layer["mlp.linear2.weight"] = state[f"{p}.mlp.linear_fc2.weight"].chunk(tp, 1)[r].clone()
            for kind in ("weight", "bias"):
                up = state.get(f"{p}.mlp.linear_fc1.{kind}")
                if up is None:
                    continue
                if m.activation == "swiglu":  # [up_r | gate_r]
                    gate = state[f"{p}.mlp.linear_gate.{kind}"]
                    layer[f"mlp.linear1.{kind}"] = torch.cat([up.chunk(tp)[r], gate.chunk(tp)[r]])
                else:
                    layer[f"mlp.linear1.{kind}"] = up.chunk(tp)[r].clone()
            for ours, up in (("attention.linear_proj.bias", "attention.dense.bias"), ("mlp.linear_fc2.bias", "mlp.linear2.bias")):
                if f"{p}.{ours}" in state:
                    layer[up] = state[f"{p}.{ours}"]
            ranks[r].append(layer)
    for r in range(tp):
        ranks[r].append(norm("final_norm", "norm"))
        if "output_layer.weight" in state:
            ranks[r].append({"final_linear.weight": state["output_layer.weight"].chunk(tp)[r].clone()})
    return ranks


def _write_upstream(ranks, root, layout):
    tag = root / "global_step100"
    (tag / "configs").mkdir(parents=True)
    (root / "latest").write_text("global_step100")
    for r, layers in enumerate(ranks):
        # pipeline indices: 0 embedding, 1 _pre_transformer_block (no file), 2.. layers, then a function, norm, head
        indices = [0] + [2 + i for i in range(len(layers) - 3)] + [len(layers) + 1, len(layers) + 2]
        indices = indices[:len(layers)]
        if layout == "pipeline":
            for index, layer in zip(indices, layers):
                torch.save(layer, tag / f"layer_{index:02d}-model_{r:02d}-model_states.pt")
        else:
            module = {f"sequential.{index}.{k}": v for index, layer in zip(indices, layers) for k, v in layer.items()}
            torch.save({"module": module}, tag / f"mp_rank_{r:02d}_model_states.pt")
    return tag


@pytest.mark.parametrize("yaml_text, layout", [(LLAMA_YAML, "pipeline"), (PYTHIA_YAML, "sequential")],
                         ids=["llama-gqa-swiglu-pipeline", "pythia-mha-gelu-sequential"])
def test_import_at_any_tp_gives_our_weights_exactly(tmp_path, yaml_text, layout):
    args, model, yaml_path = _ours(yaml_text, tmp_path)
    state = model.state_dict()
    tag = _write_upstream(_to_upstream(state, args, tp=2), tmp_path / "neox", layout)
    (tag / "configs" / "run.yml").write_text(open(yaml_path).read())
    tokens = torch.randint(0, VOCAB_ROWS, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_logits = model(tokens)
    for tp in (1, 2):
        out = tmp_path / f"ours_tp{tp}"
        import_neox_checkpoint.main(["--input_dir", str(tmp_path / "neox"), "--output", str(out),
                                     "--model-parallel-size", str(tp)])
        merged, saved_args = read_merged_model_state(str(out))
        assert saved_args.parallel.model_parallel_size == tp
        assert merged.keys() == state.keys()
        for key in state:
            assert torch.equal(merged[key], state[key]), key
        imported = GPTModel(saved_args.model, saved_args.derived, ParallelState.single()).eval()
        imported.load_state_dict(merged)
        with torch.no_grad():
            assert torch.equal(imported(tokens), expected_logits)


def test_wrong_yaml_is_a_clear_error(tmp_path):
    args, model, _ = _ours(LLAMA_YAML, tmp_path)
    tag = _write_upstream(_to_upstream(model.state_dict(), args, tp=2), tmp_path / "neox", "pipeline")
    wrong = tmp_path / "wrong.yml"
    wrong.write_text(textwrap.dedent(LLAMA_YAML).replace('"intermediate_size": 384', '"intermediate_size": 768'))
    with pytest.raises(SystemExit, match="does not match the model its YAML describes"):
        import_neox_checkpoint.main(["--input_dir", str(tag), "--config_file", str(wrong), "--output",
                                     str(tmp_path / "o")])
