#!/usr/bin/env python
"""Convert a Hugging Face GPT-NeoX or Llama model directory into our checkpoint layout.

    python tools/ckpts/convert_hf_to_neox.py --hf hf/pythia-160m --output checkpoints/pythia-160m \\
        --config-out configs/pythia-160m-model.yml

Writes `<output>/<tag>/mp_rank_00_model_states.pt` ({"module": state_dict}), `<output>/<tag>/neox_args.json`,
the `complete` marker and `<output>/latest`, plus a YAML file with the model keys. Train from it with
`load: <output>` and `finetune: true` (it has no optimizer state), and the model YAML next to your data,
tokenizer and batch settings. The checkpoint is tensor-parallel size 1 and has no pipeline stages, unless
`--model-parallel-size N` / `--pipe-parallel-size P` ask for another layout: then the weights are split into
N tensor ranks and P stages (megatron/checkpointing/pipeline_weights.py, with a `weights_only` marker), and
the printed make_vocab_size_divisible_by keeps the padded vocabulary.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import yaml  # noqa: E402

from megatron.checkpointing.hf import derived_args_from_hf_config, from_hf, model_args_from_hf_config  # noqa: E402
from megatron.checkpointing.layout import CONFIG_FILE, COMPLETE_MARKER, model_states_path, write_latest  # noqa: E402
from megatron.checkpointing.pipeline_weights import write_weights_checkpoint  # noqa: E402
from megatron.checkpointing.reshard import resharded_args  # noqa: E402
from megatron.neox_args import SECTIONS, ModelArgs, NeoXArgs  # noqa: E402

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def convert(hf_dir: str, output: str, config_out: str, tag: str = "global_step0", model_parallel_size: int = 1,
            pipe_parallel_size: int = 1) -> str:
    """Convert `hf_dir` into a checkpoint of `model_parallel_size` x `pipe_parallel_size`; returns the tag."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    model_fields = model_args_from_hf_config(config)
    model_args = ModelArgs(**model_fields)
    derived = derived_args_from_hf_config(config)
    state_dict = from_hf(hf_model.state_dict(), model_args, derived)

    dtype = next(iter(state_dict.values())).dtype
    derived.precision = DTYPE_NAMES.get(dtype, "fp32")
    sections = {name: cls() for name, cls in SECTIONS.items()}
    sections["model"] = model_args
    args = NeoXArgs(**sections, derived=derived)

    if model_parallel_size > 1 or pipe_parallel_size > 1:
        args = resharded_args(args, model_parallel_size, pipe_parallel_size)
        model_fields["make_vocab_size_divisible_by"] = args.model.make_vocab_size_divisible_by
        write_weights_checkpoint(output, tag, state_dict, args, iteration=0,
                                 note=f"written by tools/ckpts/convert_hf_to_neox.py from {hf_dir}: weights only, "
                                      f"load with finetune: true")
    else:
        os.makedirs(os.path.join(output, tag), exist_ok=True)
        torch.save({"module": state_dict}, model_states_path(output, tag, tp_rank=0))
        with open(os.path.join(output, tag, CONFIG_FILE), "w") as handle:
            handle.write(args.serialize())
        open(os.path.join(output, tag, COMPLETE_MARKER), "w").close()
        write_latest(output, tag)

    os.makedirs(os.path.dirname(os.path.abspath(config_out)), exist_ok=True)
    with open(config_out, "w") as handle:
        handle.write(f"# model keys of {hf_dir} ({config.model_type}); HF vocab_size {config.vocab_size} "
                     f"(padded rows included)\n")
        yaml.safe_dump(model_fields, handle, sort_keys=False)
    return tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + weights)")
    parser.add_argument("--output", required=True, help="our checkpoint directory to write")
    parser.add_argument("--config-out", required=True, help="YAML file to write the model keys to")
    parser.add_argument("--tag", default="global_step0", help="checkpoint tag (default global_step0)")
    parser.add_argument("--model-parallel-size", type=int, default=1, help="tensor-parallel ranks to write")
    parser.add_argument("--pipe-parallel-size", type=int, default=1, help="pipeline stages to write")
    opts = parser.parse_args(argv)
    tag = convert(opts.hf, opts.output, opts.config_out, opts.tag, opts.model_parallel_size, opts.pipe_parallel_size)
    print(f"wrote {os.path.join(opts.output, tag)} and {opts.config_out}")


if __name__ == "__main__":
    main()
