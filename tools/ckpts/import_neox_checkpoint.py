#!/usr/bin/env python
"""Import a checkpoint written by EleutherAI's GPT-NeoX into this trainer's layout, at any tensor-parallel size.

    python tools/ckpts/import_neox_checkpoint.py --input_dir /path/to/neox/checkpoints [--tag global_step143000] \\
        [--config_file pythia-160M.yml ...] --output checkpoints/pythia-160m [--model-parallel-size 2]

Reads upstream's DeepSpeed files of the tag (default: the one `latest` names): the pipeline model's
`layer_XX-model_YY-model_states.pt` or the sequential model's `mp_rank_YY_model_states.pt`, every tensor rank
(megatron/checkpointing/neox_import.py states the key and shard layout), and the run's YAML (--config_file,
default the `configs/*.yml` upstream saves inside the tag). The YAML is read with GPT-NeoX's meaning (its
upstream keys are translated as deepy.py does); data and tokenizer files are not needed. Writes
`<output>/<tag>/mp_rank_XX_model_states.pt` for the new model_parallel_size (default: upstream's), the
resolved config `neox_args.json` (padded vocabulary as in the checkpoint), `weights_only` and `complete`
markers, and `<output>/latest`. Train from it with `load: <output>` and `finetune: true`, or convert it with
convert_neox_to_hf.py. Weights only: optimizer and RNG states are not imported.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from megatron.checkpointing.layout import CheckpointError  # noqa: E402
from megatron.checkpointing.neox_import import (  # noqa: E402
    UpstreamCheckpointError, read_upstream_layers, upstream_to_ours,
)
from megatron.checkpointing.pipeline_weights import write_weights_checkpoint  # noqa: E402
from megatron.checkpointing.reshard import vocab_divisor_for  # noqa: E402
from megatron.neox_args import ConfigError, NeoXArgs  # noqa: E402
from megatron.neox_args.derive import GATED_ACTIVATIONS  # noqa: E402
from megatron.neox_args.loader import merge_settings, read_yaml_file  # noqa: E402

PLACEHOLDERS = {"data_path": "data/bundled/pystdlib_text_document", "train_micro_batch_size_per_gpu": 1,
                "lr": 1.0e-4}
"""Keys a model-only YAML may lack that the config needs to resolve; the training run sets its own."""


def _tag_dir(input_dir: str, tag: str | None) -> tuple[str, str]:
    if tag is None:
        latest = os.path.join(input_dir, "latest")
        if os.path.isfile(latest):
            tag = open(latest).read().strip()
        elif glob.glob(os.path.join(input_dir, "*model_states.pt")):  # given the tag directory itself
            return os.path.normpath(input_dir), os.path.basename(os.path.normpath(input_dir))
        else:
            raise UpstreamCheckpointError(f"--input_dir {input_dir} has no `latest` file and no model_states files; "
                                          f"give the checkpoint directory, or --tag.")
    path = os.path.join(input_dir, tag)
    if not os.path.isdir(path):
        raise UpstreamCheckpointError(f"{path} does not exist (tag {tag!r}).")
    return path, tag


def upstream_settings(config_files: list[str]):
    """The merged settings of the upstream YAML (GPT-NeoX's meaning), with placeholders for the keys a
    model-only file may lack, and without upstream's parallel layout and batch (chosen at import)."""
    documents = [(read_yaml_file(path), path) for path in config_files]
    given = {k.replace("-", "_") for data, _ in documents for k in data}
    if "optimizer" in given:
        given.add("lr")
    extra = {k: v for k, v in PLACEHOLDERS.items()
             if k not in given and not (k == "data_path" and "train_data_paths" in given)}
    kind = next((data.get("tokenizer_type", data.get("tokenizer-type")) for data, _ in documents
                 if "tokenizer_type" in data or "tokenizer-type" in data), "GPT2BPETokenizer")
    if kind not in ("CharLevelTokenizer", "ByteLevelTokenizer") and "vocab_file" not in given:
        extra["vocab_file"] = "UNSET: set vocab_file (the run's tokenizer) when training from this checkpoint"
    if kind == "GPT2BPETokenizer" and "merge_file" not in given:
        extra["merge_file"] = "UNSET: set merge_file when training from this checkpoint"
    if extra:
        documents.append((extra, "<import placeholders>"))
    settings = merge_settings(documents)
    for key in ("model_parallel_size", "pipe_parallel_size", "sequence_parallel", "num_gpus", "hostfile",
                "include", "exclude", "num_nodes", "train_batch_size", "gradient_accumulation_steps"):
        settings.pop(key, None)
    return settings


def import_checkpoint(input_dir: str, output: str, config_files: list[str] | None = None, tag: str | None = None,
                      model_parallel_size: int | None = None) -> tuple[str, NeoXArgs]:
    tag_dir, tag = _tag_dir(input_dir, tag)
    config_files = config_files or sorted(glob.glob(os.path.join(tag_dir, "configs", "*.yml")))
    if not config_files:
        raise UpstreamCheckpointError(f"no YAML given and none saved in {tag_dir}/configs; pass --config_file with "
                                      f"the run's GPT-NeoX config.")
    ranks = read_upstream_layers(tag_dir)
    upstream_tp = len(ranks)
    tp = model_parallel_size or upstream_tp
    args = NeoXArgs._build(upstream_settings(config_files), 1, check_files=False)
    derived = args.derived
    full = upstream_to_ours(ranks, num_attention_heads=args.model.num_attention_heads,
                            num_kv_heads=derived.num_kv_heads, gated=args.model.activation in GATED_ACTIVATIONS)
    rows = full["embedding.word_embeddings.weight"].shape[0]
    divisor = vocab_divisor_for(rows, rows, args.model.make_vocab_size_divisible_by, upstream_tp, tp)
    args.model.make_vocab_size_divisible_by = divisor
    args.parallel.model_parallel_size = tp
    args.derived.world_size = tp
    args.set_vocab_size(rows)
    _check_shapes(full, args)
    write_weights_checkpoint(output, tag, full, args, 0,
                             f"imported by tools/ckpts/import_neox_checkpoint.py from GPT-NeoX checkpoint {tag_dir}: "
                             f"weights only, load with finetune: true")
    return tag, args


def _check_shapes(full, args) -> None:
    from megatron.model import GPTModel
    from megatron.mpu import ParallelState

    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPTModel(args.model, args.derived, ParallelState.single()).state_dict().items()}
    problems = [f"{k}: checkpoint {tuple(full[k].shape) if k in full else 'missing'}, config {tuple(s)}"
                for k, s in expected.items() if k not in full or full[k].shape != s]
    problems += [f"{k}: in the checkpoint, not in the model of the config" for k in full if k not in expected]
    if problems:
        raise UpstreamCheckpointError("the checkpoint does not match the model its YAML describes (wrong YAML, or a "
                                      "key whose meaning differs): " + "; ".join(problems[:6]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", "--input-dir", required=True, help="GPT-NeoX checkpoint directory (holding "
                        "`latest`) or one tag directory")
    parser.add_argument("--tag", default=None, help="e.g. global_step143000 (default: latest)")
    parser.add_argument("--config_file", "--config-file", nargs="+", default=None,
                        help="the run's GPT-NeoX YAML file(s) (default: <tag>/configs/*.yml)")
    parser.add_argument("--output", required=True, help="checkpoint directory to write (ours)")
    parser.add_argument("--model-parallel-size", "--model_parallel_size", type=int, default=None,
                        help="tensor-parallel size to write (default: the checkpoint's)")
    opts = parser.parse_args(argv)
    try:
        tag, args = import_checkpoint(opts.input_dir, opts.output, opts.config_file, opts.tag, opts.model_parallel_size)
    except (UpstreamCheckpointError, CheckpointError, ConfigError, ValueError) as exc:
        raise SystemExit(f"import_neox_checkpoint.py: error: {exc}") from None
    print(f"wrote {os.path.join(opts.output, tag)} (weights only). Train from it with: load: {opts.output}, "
          f"finetune: true, model_parallel_size: {args.parallel.model_parallel_size}, "
          f"make_vocab_size_divisible_by: {args.model.make_vocab_size_divisible_by}")


if __name__ == "__main__":
    main()
