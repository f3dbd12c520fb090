#!/usr/bin/env python
"""Convert a checkpoint (ours, or one written by EleutherAI's GPT-NeoX) to a Hugging Face model directory.

    python tools/ckpts/convert_neox_to_hf.py --load checkpoints/run1 [--tag global_step100] --output hf/run1
    # GPT-NeoX's flags, same meaning:
    python tools/ckpts/convert_neox_to_hf.py --input_dir /neox/checkpoints/global_step143000 \\
        --config_file pythia-160M.yml --output_dir hf/pythia-160m --precision auto --architecture neox

The family follows the model config: RMSNorm/SwiGLU models become `LlamaForCausalLM` (`--architecture
llama`, or `mistral`: MistralForCausalLM with the same weights, sliding window from sliding_window_width
when the config has one), the others `GPTNeoXForCausalLM` (`neox`); an --architecture the model cannot be
is an error. The HF `vocab_size` is our real (unpadded) vocabulary: the padding rows take no
probability in our model, so they are left out. A checkpoint saved with model_parallel_size > 1 or
pipe_parallel_size > 1 is read rank by rank (pipeline checkpoints: one file per layer spec and tensor rank,
megatron/checkpointing/pipeline_weights.py) and merged in memory. A GPT-NeoX checkpoint (layer_XX-model_YY files, no
neox_args.json) is read through tools/ckpts/import_neox_checkpoint.py's reader with its YAML (--config_file).

`--precision auto|fp32|fp16|bf16` (default auto: as saved) casts the weights. The tokenizer of the config
(HFTokenizer's tokenizer.json, GPT2BPETokenizer/HFGPT2Tokenizer's vocab.json + merges.txt) is saved beside
the model unless `--no_save_tokenizer`; config.json gets bos/eos/pad ids from it (eos = bos = the
end-of-document id, as GPT-NeoX's converter writes them). config.json carries the rotary settings in both
spellings: transformers 5's `rope_parameters` and the legacy `rope_theta` (Llama; GPT-NeoX also `rotary_pct`,
`rotary_emb_base`) that transformers 4.4x reads, so both read the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.checkpointing.hf import hf_config, to_hf  # noqa: E402
from megatron.checkpointing.reshard import read_merged_model_state  # noqa: E402
from megatron.neox_args.derive import GATED_ACTIVATIONS  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARCHITECTURES = {"neox": "gpt_neox", "llama": "llama", "mistral": "llama"}


def _is_upstream(path: str) -> bool:
    from megatron.checkpointing.layout import CONFIG_FILE

    tag_dirs = [path] + [os.path.join(path, open(os.path.join(path, "latest")).read().strip())
                         for _ in [0] if os.path.isfile(os.path.join(path, "latest"))]
    return not any(os.path.isfile(os.path.join(d, CONFIG_FILE)) for d in tag_dirs)


def read_checkpoint(load: str, tag: str | None, config_files: list[str] | None):
    """(TP=1 state dict, NeoXArgs) of our checkpoint, or of a GPT-NeoX one (with its YAML)."""
    if os.path.isdir(load) and _is_upstream(load):
        import import_neox_checkpoint
        from megatron.checkpointing.neox_import import read_upstream_layers, upstream_to_ours
        from megatron.neox_args import NeoXArgs

        tag_dir, _ = import_neox_checkpoint._tag_dir(load, tag)
        files = config_files or sorted(__import__("glob").glob(os.path.join(tag_dir, "configs", "*.yml")))
        if not files:
            raise CheckpointError(f"{tag_dir} is a GPT-NeoX checkpoint; pass its YAML with --config_file.")
        args = NeoXArgs._build(import_neox_checkpoint.upstream_settings(files), 1, check_files=False)
        full = upstream_to_ours(read_upstream_layers(tag_dir), num_attention_heads=args.model.num_attention_heads,
                                num_kv_heads=args.derived.num_kv_heads, gated=args.model.activation in GATED_ACTIVATIONS)
        rows = full["embedding.word_embeddings.weight"].shape[0]
        args.model.make_vocab_size_divisible_by = rows
        args.set_vocab_size(rows)
        import_neox_checkpoint._check_shapes(full, args)
        return full, args
    if tag is None and os.path.isfile(os.path.join(load, "neox_args.json")):  # --input_dir names the tag itself
        load, tag = os.path.dirname(os.path.normpath(load)), os.path.basename(os.path.normpath(load))
    return read_merged_model_state(load, tag=tag)  # every tensor rank and stage, merged


def _tokenizer(args):
    """(transformers tokenizer or None, why not)."""
    import transformers

    t = args.tokenizer
    eos = "<|endoftext|>"
    if t.tokenizer_type == "HFTokenizer" and t.vocab_file and os.path.isfile(t.vocab_file):
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=t.vocab_file)
        from megatron.tokenizer import build_tokenizer

        eod = build_tokenizer(t).eod
        token = tok.convert_ids_to_tokens(eod)
        tok.eos_token = tok.bos_token = token
        return tok, ""
    if t.tokenizer_type in ("GPT2BPETokenizer", "HFGPT2Tokenizer") and t.vocab_file:
        vocab = t.vocab_file if os.path.isfile(t.vocab_file) else os.path.join(t.vocab_file, "vocab.json")
        merges = t.merge_file or os.path.join(os.path.dirname(vocab), "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            tok = transformers.GPT2TokenizerFast.from_pretrained(os.path.dirname(os.path.abspath(vocab)),
                                                                 local_files_only=True) \
                if os.path.basename(vocab) == "vocab.json" and os.path.dirname(vocab) == os.path.dirname(merges) \
                else None
            if tok is None:
                raise CheckpointError("vocab.json and merges.txt must sit in one directory to be saved as an HF "
                                      "tokenizer; use --no_save_tokenizer or move them.")
            tok.eos_token = tok.bos_token = eos
            if t.tokenizer_type == "HFGPT2Tokenizer":
                tok.add_special_tokens({"pad_token": "<|padding|>"})
            return tok, ""
    return None, (f"tokenizer_type {t.tokenizer_type} with vocab_file {t.vocab_file!r} has no Hugging Face "
                  f"tokenizer to save (or its file is not on this machine)")


def _our_eod(args):
    """The end-of-document id of the run's tokenizer, or None when it cannot be built here."""
    from megatron.tokenizer import build_tokenizer

    try:
        return build_tokenizer(args.tokenizer).eod
    except Exception:  # tokenizer files not on this machine
        return None


def _legacy_rope_fields(output: str, args) -> None:
    """Add transformers 4.4x's spellings of the rotary settings to config.json (5.x reads rope_parameters)."""
    path = os.path.join(output, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config["rope_theta"] = float(args.model.rotary_emb_base)
    if config.get("model_type") == "gpt_neox":
        config["rotary_pct"] = args.model.rotary_pct
        config["rotary_emb_base"] = args.model.rotary_emb_base
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def convert(load: str, output: str, tag: str | None = None, *, config_files=None, precision: str = "auto",
            architecture: str | None = None, save_tokenizer: bool = True) -> tuple[str, str]:
    """Write the HF model of checkpoint `load`/`tag` to `output`; returns (output, note about the tokenizer)."""
    import transformers

    state_dict, args = read_checkpoint(load, tag, config_files)
    hf_state = to_hf(state_dict, args.model, args.derived)
    if precision != "auto":
        hf_state = {k: v.to(PRECISIONS[precision]) for k, v in hf_state.items()}
    config = hf_config(args.model, args.derived)
    if architecture is not None and ARCHITECTURES[architecture] != config.model_type:
        raise CheckpointError(f"--architecture {architecture}: this model is an HF {config.model_type} model "
                              f"(norm {args.model.norm}, activation {args.model.activation}); use --architecture "
                              f"{'neox' if config.model_type == 'gpt_neox' else 'llama'}.")
    if architecture == "mistral":
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures",
                                                                          "transformers_version")}
        window = getattr(args.model, "sliding_window_width", None)
        config = transformers.MistralConfig(**fields, sliding_window=window, architectures=["MistralForCausalLM"])
    tokenizer, why_not = _tokenizer(args) if save_tokenizer else (None, "--no_save_tokenizer")
    if tokenizer is not None:
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    else:  # never the config class's defaults (ids of unrelated tokens): our tokenizer's eod, or none
        config.bos_token_id = config.eos_token_id = _our_eod(args)
        config.pad_token_id = None
    config.dtype = next(iter(hf_state.values())).dtype
    with torch.device("meta"):  # no second copy of the weights: load_state_dict(assign=True) below
        model = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"key map mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.tie_weights()
    model.save_pretrained(output, safe_serialization=True)
    _legacy_rope_fields(output, args)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
        return output, "tokenizer saved beside the model"
    return output, f"tokenizer not saved: {why_not}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", "--input_dir", dest="load", required=True,
                        help="checkpoint directory (holding `latest`) or one tag directory; ours or GPT-NeoX's")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step100 (default: latest)")
    parser.add_argument("--config_file", nargs="+", default=None,
                        help="GPT-NeoX checkpoints: the run's YAML file(s) (default: <tag>/configs/*.yml)")
    parser.add_argument("--output", "--output_dir", dest="output", required=True, help="HF model directory to write")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="dtype of the written weights (auto: as saved)")
    parser.add_argument("--architecture", choices=list(ARCHITECTURES), default=None,
                        help="neox, llama or mistral; default: what the model is")
    parser.add_argument("--no_save_tokenizer", action="store_true", help="do not save the tokenizer beside the model")
    opts = parser.parse_args(argv)
    if os.path.exists(opts.output) and not os.path.isdir(opts.output):
        raise SystemExit(f"convert_neox_to_hf.py: error: --output {opts.output} is an existing file, not a "
                         f"directory; the HF model is a directory (config.json + model.safetensors). Choose "
                         f"another path or remove the file.")
    try:
        out, note = convert(opts.load, opts.output, opts.tag, config_files=opts.config_file,
                            precision=opts.precision, architecture=opts.architecture,
                            save_tokenizer=not opts.no_save_tokenizer)
    except (CheckpointError, ValueError) as exc:
        raise SystemExit(f"convert_neox_to_hf.py: error: {exc}") from None
    written = os.path.join(out, "config.json")
    if not os.path.isfile(written):  # never report a write that did not happen
        raise SystemExit(f"convert_neox_to_hf.py: error: nothing was written to {out} ({written} is missing).")
    print(f"wrote {out} ({note})")


if __name__ == "__main__":
    main()
