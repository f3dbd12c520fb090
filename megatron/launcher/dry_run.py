"""What `deepy.py --dry-run` shows besides the resolved config: the exact parameter count of the model that
will be built, the DeepSpeed config that will be passed, and what the GPT-NeoX key table did.

The count comes from building the model on the meta device (no memory, no data), at tensor-parallel size 1
(the full model; each tensor rank holds about 1/tp of it), with the tokenizer's padded vocabulary.
"""

from __future__ import annotations

import copy
import json


def parameter_counts(args) -> dict:
    """{"total", "without_embedding_and_output", "padded_vocab_size"} of the full (TP=1) model.

    "without_embedding_and_output" leaves out the input word embedding and the untied output layer (the
    convention of Pythia's "non-embedding" counts); learned position embeddings are counted.
    """
    model, padded_vocab_size = meta_model(args)
    total = sum(p.numel() for p in model.parameters())
    embedding_and_output = sum(p.numel() for name, p in model.named_parameters()
                               if name in ("embedding.word_embeddings.weight", "output_layer.weight"))
    return {"total": total, "without_embedding_and_output": total - embedding_and_output,
            "padded_vocab_size": padded_vocab_size}


def meta_model(args):
    """(the full (TP=1) GPTModel of `args` on the meta device, the tokenizer's padded vocabulary size)."""
    import torch

    from megatron.model import GPTModel
    from megatron.mpu import ParallelState
    from megatron.neox_args.derive import pad_vocab_size
    from megatron.tokenizer import build_tokenizer

    derived = copy.deepcopy(args.derived)
    vocab = build_tokenizer(args.tokenizer).vocab_size
    derived.vocab_size = vocab
    derived.padded_vocab_size = pad_vocab_size(vocab, args.model.make_vocab_size_divisible_by,
                                               args.parallel.model_parallel_size)
    with torch.device("meta"):
        model = GPTModel(args.model, derived, ParallelState.single())
    return model, derived.padded_vocab_size


def describe(args) -> str:
    """The dry-run report as YAML comment lines (the JSON of the DeepSpeed config is indented after `#   `)."""
    lines = []
    try:
        counts = parameter_counts(args)
        lines.append(f"# parameters: {counts['total']:,} total, {counts['without_embedding_and_output']:,} "
                     f"without the input embedding and output layer (padded vocabulary "
                     f"{counts['padded_vocab_size']:,}, full model at tensor-parallel size 1)")
    except Exception as err:  # a tokenizer file that is not on this machine: show the rest anyway
        lines.append(f"# parameters: not counted: the tokenizer could not be built here ({err})")
    lines.append("# DeepSpeed config passed to deepspeed.initialize (JSON; YAML comments keep the output one "
                 "YAML document)")
    lines += ["#   " + line for line in json.dumps(args.deepspeed_config(), indent=2, sort_keys=True).splitlines()]
    for note in args.upstream_notes:
        lines.append(f"# GPT-NeoX key translated: {note}")
    for key, (source, why) in sorted(args.upstream_noops.items()):
        lines.append(f"# GPT-NeoX key accepted, no effect here: {key} ({source}): {why}")
    return "\n".join(lines) + "\n"
