#!/usr/bin/env python
"""Convert one of our checkpoints to a Hugging Face model directory (safetensors + config.json).

    python tools/ckpts/convert_neox_to_hf.py --load checkpoints/run1 [--tag global_step100] --output hf/run1

The family follows the model config: RMSNorm/SwiGLU models become `LlamaForCausalLM`, the others
`GPTNeoXForCausalLM` (see megatron/checkpointing/hf.py). The HF `vocab_size` is our real (unpadded)
vocabulary: the padding rows take no probability in our model, so they are left out.
A checkpoint saved with model_parallel_size > 1 or pipe_parallel_size > 1 is read rank by rank (pipeline
checkpoints: one file per layer spec and tensor rank, megatron/checkpointing/pipeline_weights.py) and merged
in memory (megatron/checkpointing/reshard.py); nothing is written next to it. ZeRO stage 3 checkpoints must be
consolidated first (the error says how).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.checkpointing.hf import hf_config, to_hf  # noqa: E402
from megatron.checkpointing.reshard import read_merged_model_state  # noqa: E402


def convert(load: str, output: str, tag: str | None = None) -> str:
    """Write the HF model of checkpoint `load`/`tag` (default: latest) to `output`; returns `output`."""
    import transformers

    state_dict, args = read_merged_model_state(load, tag=tag)  # every tensor rank and stage, merged
    hf_state = to_hf(state_dict, args.model, args.derived)
    config = hf_config(args.model, args.derived)
    config.dtype = next(iter(hf_state.values())).dtype
    with torch.device("meta"):  # no second copy of the weights: load_state_dict(assign=True) below
        model = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"key map mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.tie_weights()
    model.save_pretrained(output, safe_serialization=True)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="our checkpoint directory (the one holding `latest`)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step100 (default: latest)")
    parser.add_argument("--output", required=True, help="HF model directory to write")
    opts = parser.parse_args(argv)
    if os.path.exists(opts.output) and not os.path.isdir(opts.output):
        raise SystemExit(f"convert_neox_to_hf.py: error: --output {opts.output} is an existing file, not a "
                         f"directory; the HF model is a directory (config.json + model.safetensors). Choose "
                         f"another path or remove the file.")
    try:
        out = convert(opts.load, opts.output, opts.tag)
    except CheckpointError as exc:
        raise SystemExit(f"convert_neox_to_hf.py: error: {exc}") from None
    written = os.path.join(out, "config.json")
    if not os.path.isfile(written):  # never report a write that did not happen
        raise SystemExit(f"convert_neox_to_hf.py: error: nothing was written to {out} ({written} is missing).")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
