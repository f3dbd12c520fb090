"""Change the tensor-parallel (TP) size of a GPTModel state dict: merge the TP shards into full tensors,
split full tensors into TP shards.

How a parameter lies over `tp` ranks (megatron/mpu/layers.py; each layer keeps chunk `r` of its full
master weight, `full.narrow(d, r * n/tp, n/tp)`):

    ColumnParallelLinear   Y = X A^T + b, A [out, in]: rows split,    rank r holds A[r], b[r]   (dim 0)
    RowParallelLinear      Y = X A^T + b, A [out, in]: columns split, rank r holds A[:, r]      (dim 1);
                           b replicated (added once, after the reduction)
    VocabParallelEmbedding E [padded_vocab, h]: rows split                                      (dim 0)
    untied output layer    column-parallel                                                      (dim 0)
    norms, learned position embeddings                                                          replicated

so for a tensor split on dim d, with shard_r the r-th of tp equal contiguous chunks along d:

    merge:  full    = cat([shard_0, ..., shard_{tp-1}], dim=d)
    split:  shard_r = full.chunk(tp, dim=d)[r]

and a replicated tensor is the same on every rank (merge checks that the ranks agree bitwise and keeps
one copy; split gives every rank the full tensor).

Fused QKV (megatron/model/attention.py): `linear_qkv` rows are laid out per key/value group,
[q heads of group g, k_g, v_g] for g = 0 .. num_kv_heads-1, so the r-th contiguous row chunk is exactly the
num_kv_heads/tp whole groups rank r computes with: QKV is a plain dim-0 split, valid when num_kv_heads
(and so num_attention_heads) is divisible by tp. SwiGLU: `linear_fc1` and `linear_gate` are split alike,
so rank r's up and gate shards cover the same intermediate columns.

Vocabulary: the embedding (and untied output layer) keep their `padded_vocab_size` rows unchanged; a new
tp must divide it. `resharded_args` then records a make_vocab_size_divisible_by that reproduces the same
padded size at the new tp, so that a config with it matches the checkpoint.

`SHARDING` is the whole contract: a key that matches no pattern raises (a sharded tensor is never
replicated by default).
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional

import torch

from megatron.checkpointing.layout import CheckpointError, read_model_state, resolve_tag
from megatron.neox_args.sections import DerivedArgs, ModelArgs

StateDict = Dict[str, torch.Tensor]

COLUMN_PARALLEL = 0  # ColumnParallelLinear, VocabParallelEmbedding: rows (dim 0) split
ROW_PARALLEL = 1  # RowParallelLinear weight: columns (dim 1) split
REPLICATED = None  # the full tensor on every rank

# key pattern -> the dim it is split on; `{i}` is a layer index, `{weight,bias}` either parameter
SHARDING: Dict[str, Optional[int]] = {
    "embedding.word_embeddings.weight": COLUMN_PARALLEL,
    "embedding.position_embeddings.weight": REPLICATED,
    "layers.{i}.input_norm.{weight,bias}": REPLICATED,
    "layers.{i}.attention.linear_qkv.{weight,bias}": COLUMN_PARALLEL,
    "layers.{i}.attention.linear_proj.weight": ROW_PARALLEL,
    "layers.{i}.attention.linear_proj.bias": REPLICATED,
    "layers.{i}.post_attention_norm.{weight,bias}": REPLICATED,
    "layers.{i}.mlp.linear_fc1.{weight,bias}": COLUMN_PARALLEL,
    "layers.{i}.mlp.linear_gate.{weight,bias}": COLUMN_PARALLEL,
    "layers.{i}.mlp.linear_fc2.weight": ROW_PARALLEL,
    "layers.{i}.mlp.linear_fc2.bias": REPLICATED,
    "final_norm.{weight,bias}": REPLICATED,
    "output_layer.weight": COLUMN_PARALLEL,
}

WEIGHTS_ONLY_MARKER = "weights_only"  # in a tag directory: no optimizer/RNG states, load with finetune


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\{i\}", r"\d+").replace(r"\{weight,bias\}", "(weight|bias)")
    return re.compile(regex)


_COMPILED = [(_compile(pattern), dim) for pattern, dim in SHARDING.items()]


def split_dim(key: str) -> Optional[int]:
    """The dim `key` is split on over tensor-parallel ranks, or None (replicated); KeyError if unknown."""
    for regex, dim in _COMPILED:
        if regex.fullmatch(key):
            return dim
    raise KeyError(f"state-dict key {key!r} is not in megatron/checkpointing/reshard.py SHARDING: it is "
                   f"unknown how it is laid out over tensor-parallel ranks. Add its pattern there.")


def check_tp_size(model: ModelArgs, derived: DerivedArgs, tp: int) -> None:
    """ValueError naming every size that `tp` does not divide."""
    if tp < 1:
        raise ValueError(f"model_parallel_size must be >= 1, got {tp}")
    sizes = [("num_attention_heads", model.num_attention_heads), ("num_kv_heads", derived.num_kv_heads),
             ("intermediate_size", derived.intermediate_size), ("padded_vocab_size", derived.padded_vocab_size)]
    bad = [f"{name} {value}" for name, value in sizes if value % tp != 0]
    if bad:
        hint = (" (the padded vocabulary is a multiple of make_vocab_size_divisible_by "
                f"{model.make_vocab_size_divisible_by} x the saved model_parallel_size; choose a "
                f"model_parallel_size dividing {derived.padded_vocab_size})"
                if derived.padded_vocab_size % tp else "")
        raise ValueError(f"model_parallel_size {tp} does not divide {', '.join(bad)}: tensor parallelism "
                         f"splits each of them evenly over the ranks{hint}.")


def merge_tp_shards(shards: List[StateDict], model: ModelArgs, derived: DerivedArgs) -> StateDict:
    """The TP=1 state dict of a model whose rank-r state dict is `shards[r]`."""
    tp = len(shards)
    check_tp_size(model, derived, tp)
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise ValueError(f"tensor-parallel rank {rank} has other keys than rank 0: {diff[:8]}")
    full: StateDict = {}
    for key in keys:
        dim = split_dim(key)
        tensors = [shard[key] for shard in shards]
        if dim is REPLICATED:
            for rank, tensor in enumerate(tensors[1:], start=1):
                if tensor.shape != tensors[0].shape or not torch.equal(tensor, tensors[0]):
                    raise ValueError(f"{key} is replicated over tensor-parallel ranks but rank {rank} holds "
                                     f"other values than rank 0")
            full[key] = tensors[0]
        else:
            full[key] = torch.cat(tensors, dim=dim)
    vocab_rows = full["embedding.word_embeddings.weight"].shape[0]
    if vocab_rows != derived.padded_vocab_size:
        raise ValueError(f"the merged embedding has {vocab_rows} rows, the config's padded_vocab_size is "
                         f"{derived.padded_vocab_size}: the shards do not belong to this config")
    return full


def split_tp(full: StateDict, model: ModelArgs, derived: DerivedArgs, tp: int) -> List[StateDict]:
    """The state dicts of ranks 0..tp-1 for the TP=1 state dict `full`. Split tensors are fresh contiguous
    copies (saving one writes only its shard); replicated tensors are shared, not copied."""
    check_tp_size(model, derived, tp)
    shards: List[StateDict] = [{} for _ in range(tp)]
    for key, tensor in full.items():
        dim = split_dim(key)
        if dim is REPLICATED:
            for shard in shards:
                shard[key] = tensor
            continue
        if tensor.shape[dim] % tp != 0:
            raise ValueError(f"{key} has {tensor.shape[dim]} entries on dim {dim}, not divisible by {tp}")
        for shard, chunk in zip(shards, tensor.chunk(tp, dim=dim)):
            shard[key] = chunk.clone()
    return shards


def vocab_divisor_for(vocab_size: int, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                      old_tp: int, tp: int) -> int:
    """A make_vocab_size_divisible_by m with pad(vocab_size, m, tp) == padded_vocab_size (the padding rule of
    megatron/neox_args/derive.py: round up to a multiple of m x tp): the same product m x tp as before when
    possible, else the smallest divisor of padded_vocab_size / tp that reproduces the size."""
    if padded_vocab_size % tp != 0:
        raise ValueError(f"padded_vocab_size {padded_vocab_size} (make_vocab_size_divisible_by "
                         f"{make_vocab_size_divisible_by} x model_parallel_size {old_tp}) is not divisible by "
                         f"model_parallel_size {tp}")
    vocab = vocab_size or padded_vocab_size
    pads_to = lambda m: math.ceil(vocab / (m * tp)) * m * tp == padded_vocab_size  # noqa: E731
    same_product = make_vocab_size_divisible_by * old_tp
    if same_product % tp == 0 and pads_to(same_product // tp):
        return same_product // tp
    per_rank = padded_vocab_size // tp
    return next(m for m in range(1, per_rank + 1) if per_rank % m == 0 and pads_to(m))


def resharded_args(args, tp: int, pp: int | None = None):
    """A copy of NeoXArgs `args` for the same model at model_parallel_size `tp` (and pipe_parallel_size `pp`,
    default unchanged): same padded vocabulary (make_vocab_size_divisible_by adjusted), same data-parallel
    size and batch (world_size = tp x pp x dp), sequence_parallel kept only where it stays valid."""
    from megatron.neox_args import NeoXArgs

    old_tp = args.parallel.model_parallel_size
    check_tp_size(args.model, args.derived, tp)
    pp = args.parallel.pipe_parallel_size if pp is None else pp
    if pp > 1 and args.model.num_layers < pp:
        raise ValueError(f"pipe_parallel_size {pp} is more than num_layers {args.model.num_layers}: every stage "
                         f"needs a transformer layer")
    new = NeoXArgs.from_serialized(args.serialize())
    new.model.make_vocab_size_divisible_by = vocab_divisor_for(
        args.derived.vocab_size, args.derived.padded_vocab_size, args.model.make_vocab_size_divisible_by, old_tp, tp)
    new.parallel.model_parallel_size = tp
    new.parallel.pipe_parallel_size = pp
    new.parallel.sequence_parallel = args.parallel.sequence_parallel and tp > 1 and args.model.seq_length % tp == 0
    new.derived.world_size = tp * max(pp, 1) * args.derived.data_parallel_size
    return new


def read_merged_model_state(load_dir: str, tag: str | None = None):
    """`(TP=1, PP=1 state dict, NeoXArgs as saved)` of checkpoint `load_dir`/`tag` (default: latest), every
    tensor-parallel rank (and pipeline stage) read and merged. CheckpointError for a missing or incomplete
    tag, ZeRO-3."""
    from megatron.checkpointing.pipeline_weights import read_tp_state

    tag = resolve_tag(load_dir, tag)
    args = _saved_args(load_dir, tag)
    if max(args.parallel.pipe_parallel_size, 1) > 1:
        shards = [read_tp_state(load_dir, tag, r, args) for r in range(args.parallel.model_parallel_size)]
        return merge_tp_shards(shards, args.model, args.derived), args
    first, args = read_model_state(load_dir, tag, tp_rank=0)
    shards = [first] + [read_model_state(load_dir, tag, tp_rank=r)[0]
                        for r in range(1, args.parallel.model_parallel_size)]
    return merge_tp_shards(shards, args.model, args.derived), args


def _saved_args(load_dir: str, tag: str):
    from megatron.checkpointing.layout import CONFIG_FILE
    from megatron.neox_args import NeoXArgs

    path = os.path.join(load_dir, tag, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: this checkpoint does not carry its config.")
    with open(path) as handle:
        return NeoXArgs.from_serialized(handle.read())
