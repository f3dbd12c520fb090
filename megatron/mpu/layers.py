"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

They are used like `nn.Linear` / `nn.Embedding`; the collectives live in `mappings.py`.
Activations are `[s, b, h]` (sequence first); under sequence parallelism (SP) the activations
outside the tensor-parallel region are sharded along the sequence: `[s/p, b, h]`.

Initialization is independent of the tensor-parallel size: each layer draws its FULL master
weight with `init_method` (the model passes keyed callables, megatron/model/init.py, so each weight has
its own generator; the default here draws from the default torch generator), then keeps its own shard,
so TP=1 and TP=p runs built with the same seed start from identical weights. Vocabulary padding rows
(`VocabParallelEmbedding(vocab_size=...)`, `ColumnParallelLinear(unpadded_out_features=...)`) are not
drawn: the master holds the unpadded rows, then zeros.

Parameter attributes:
  - sharded parameters: `tensor_model_parallel = True`, `partition_dim`, `partition_stride = 1`
    (DeepSpeed's grad norm counts them on every tensor rank; others only on tensor rank 0);
  - parameters acting on sequence-sharded activations under SP: `sequence_parallel_grad = True`
    (their gradients are summed over the tensor group once per step by `mpu.grads`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .sequence_parallel_linear import linear_with_sequence_parallel_gather

InitMethod = Callable[[torch.Tensor], Any]


def default_init_method(weight: torch.Tensor) -> torch.Tensor:
    """Normal(0, 0.02), GPT-2 / GPT-NeoX's default."""
    return nn.init.normal_(weight, mean=0.0, std=0.02)


def mark_tensor_parallel_param(param: nn.Parameter, partition_dim: int, stride: int = 1) -> None:
    """Mark `param` as a shard along `partition_dim` of a tensor-parallel weight."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def mark_sequence_parallel_param(param: nn.Parameter) -> None:
    """Mark `param` so its gradient is summed over the tensor group under sequence parallelism.

    Use it for every parameter replicated across tensor ranks that acts on sequence-sharded
    activations: norm weights and biases, a row-parallel bias added after the reduce-scatter,
    learned position embeddings looked up per sequence shard.
    """
    param.sequence_parallel_grad = True


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) must be divisible by the tensor-parallel size "
                         f"({denominator}).")
    return numerator // denominator


def _init_shard_from_master(shard: torch.Tensor, full_shape: tuple, partition_dim: int,
                            init_method: InitMethod, rank: int, world: int,
                            valid_rows: Optional[int] = None) -> None:
    """Draw the full master weight (fp32) and copy chunk `rank` (along `partition_dim`) into `shard`.

    With `valid_rows` < full_shape[0] only the first `valid_rows` rows are drawn (the unpadded
    vocabulary) and the rest of the master is zero, so padding never shifts or changes a drawn value.
    At world size 1 with an fp32 CPU shard and no padding the draw goes straight into the shard (the
    same values, no copy)."""
    rows = full_shape[0]
    valid_rows = rows if valid_rows is None else valid_rows
    if not 0 < valid_rows <= rows:
        raise ValueError(f"valid rows {valid_rows} must be in [1, {rows}]")
    with torch.no_grad():
        if world == 1 and valid_rows == rows and shard.dtype == torch.float32 and shard.device.type == "cpu":
            init_method(shard)
            return
        if valid_rows == rows:
            master = torch.empty(full_shape, dtype=torch.float32)
            init_method(master)
        else:
            master = torch.zeros(full_shape, dtype=torch.float32)
            init_method(master[:valid_rows])  # a contiguous view: the same draw as a [valid_rows, ...] tensor
        chunk = full_shape[partition_dim] // world
        shard.copy_(master.narrow(partition_dim, rank * chunk, chunk))


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A split by columns across the tensor group.

    A = [A_1 ... A_p] (columns), b = [b_1 ... b_p]; rank r computes Y_r = X A_r + b_r, so
    Y = [Y_1 ... Y_p] is sharded along the last dim. The weight is stored as nn.Linear's,
    A_r^T: `[out/p, in]`, bias `[out/p]`.

    Input `[s, b, in]` (replicated); under SP the input is `[s/p, b, in]` and is all-gathered
    along the sequence first (backward: reduce-scatter); only the local shard is saved for the
    weight gradient, re-gathered in backward (`sequence_parallel_linear`). Output `[s, b, out/p]`,
    or `[s, b, out]` with `gather_output=True` (all-gather of the last dim; not allowed with SP).
    With `skip_bias_add=True` the bias is not added: the caller adds `self.bias` (for fusions).
    `unpadded_out_features` (the untied output layer: the real vocabulary): output rows from it on are
    padding, zero at init and never drawn.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group: Any, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 init_method: InitMethod = default_init_method, skip_bias_add: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 unpadded_out_features: Optional[int] = None):
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be combined with "
                             "sequence_parallel=True (the output would be replicated, not sequence-sharded).")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.out_features_per_partition = _divide(out_features, self.tp_size, "ColumnParallelLinear out_features")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.skip_bias_add = skip_bias_add

        self.weight = nn.Parameter(torch.empty(self.out_features_per_partition, in_features,
                                               dtype=params_dtype, device=device))
        _init_shard_from_master(self.weight, (out_features, in_features), 0, init_method,
                                self.tp_rank, self.tp_size, valid_rows=unpadded_out_features)
        mark_tensor_parallel_param(self.weight, partition_dim=0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features_per_partition, dtype=params_dtype,
                                                 device=device))
            mark_tensor_parallel_param(self.bias, partition_dim=0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.skip_bias_add else self.bias
        if self.sequence_parallel:
            # all-gather [s/p,b,in] -> [s,b,in] and matmul; saves only the local shard for backward
            y = linear_with_sequence_parallel_gather(x, self.weight, bias, self.tp_group)  # [s,b,out/p]
        else:
            x = copy_to_tensor_parallel_region(x, self.tp_group)                   # [s,b,in]
            y = F.linear(x, self.weight, bias)                                        # [s,b,out/p]
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.tp_group)                  # [s,b,out]
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = XA + b with A split by rows and X by columns across the tensor group.

    A = [A_1; ...; A_p] (rows), X = [X_1 ... X_p] (last dim); rank r computes the partial
    product X_r A_r and Y = sum_r X_r A_r + b. The sum is an all-reduce (output `[s, b, out]`),
    or under SP a reduce-scatter along the sequence (output `[s/p, b, out]`). The bias is
    replicated and added ONCE, after the reduction; under SP it is added on the sequence shard,
    so its gradient is partial per rank and it is marked `sequence_parallel_grad`.
    Weight stored as nn.Linear's, A_r^T: `[out, in/p]`; bias `[out]`.

    `input_is_parallel=True`: the input is already `[s, b, in/p]` (a column-parallel output);
    otherwise the full `[s, b, in]` is split along the last dim first (not allowed with SP).
    With `skip_bias_add=True` the bias is not added: the caller adds `self.bias`.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group: Any, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_method: InitMethod = default_init_method, skip_bias_add: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True.")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.in_features_per_partition = _divide(in_features, self.tp_size, "RowParallelLinear in_features")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.skip_bias_add = skip_bias_add

        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_partition,
                                               dtype=params_dtype, device=device))
        _init_shard_from_master(self.weight, (out_features, in_features), 1, init_method,
                                self.tp_rank, self.tp_size)
        mark_tensor_parallel_param(self.weight, partition_dim=1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=params_dtype, device=device))
            if sequence_parallel:
                mark_sequence_parallel_param(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp_group)                  # [s,b,in/p]
        return self.reduce_partial(F.linear(x, self.weight))                         # [s,b,out] partial sum

    def reduce_partial(self, partial: torch.Tensor) -> torch.Tensor:
        """Y = sum_r partial_r (+ b): the reduction and bias of `forward`, for a caller that computed this
        rank's partial product X_r A_r itself (the fused MLP, megatron/model/fused_mlp.py)."""
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group, seq_dim=0)  # [s/p,b,out]
        else:
            y = reduce_from_tensor_parallel_region(partial, self.tp_group)            # [s,b,out]
        if self.bias is not None and not self.skip_bias_add:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.tp_size}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding E `[V, h]` split by rows (vocabulary) across the tensor group.

    E = [E_1; ...; E_p]; rank r holds rows [r*V/p, (r+1)*V/p). For a token t, rank r looks up
    E[t] if t is in its range and 0 otherwise, so out = sum_r lookup_r(t) = E[t]. The sum is an
    all-reduce (output `[..., h]`), or under SP a reduce-scatter along the sequence: the input is
    then `[s, b]` tokens and the output `[s/p, b, h]`.
    Weight `[V/p, h]`, marked `tensor_model_parallel` with `partition_dim = 0`.
    `vocab_size` (default: all rows): the real vocabulary; rows from it on are padding (zero at init,
    never drawn; tokens never reach them, and the losses exclude them: `mpu.cross_entropy`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: Any,
                 init_method: InitMethod = default_init_method, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 vocab_size: Optional[int] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.sequence_parallel = sequence_parallel
        per_partition = _divide(num_embeddings, self.tp_size, "VocabParallelEmbedding num_embeddings "
                                "(pad the vocabulary, see padded_vocab_size)")
        self.vocab_start_index = self.tp_rank * per_partition
        self.vocab_end_index = self.vocab_start_index + per_partition
        self.num_embeddings_per_partition = per_partition
        self.vocab_size = num_embeddings if vocab_size is None else vocab_size

        self.weight = nn.Parameter(torch.empty(per_partition, embedding_dim, dtype=params_dtype, device=device))
        _init_shard_from_master(self.weight, (num_embeddings, embedding_dim), 0, init_method,
                                self.tp_rank, self.tp_size, valid_rows=self.vocab_size)
        mark_tensor_parallel_param(self.weight, partition_dim=0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            outside = (tokens < self.vocab_start_index) | (tokens >= self.vocab_end_index)  # [...]
            local_ids = (tokens - self.vocab_start_index).masked_fill(outside, 0)
            partial = F.embedding(local_ids, self.weight)                                      # [..., h]
            partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            partial = F.embedding(tokens, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.tp_group, seq_dim=0)  # [s/p,b,h]
        return reduce_from_tensor_parallel_region(partial, self.tp_group)                       # [..., h]

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"tp_size={self.tp_size}, sequence_parallel={self.sequence_parallel}")
