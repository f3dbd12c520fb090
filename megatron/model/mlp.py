"""The feed-forward block: gelu / relu / silu MLP, or the gated SwiGLU MLP (Llama).

    gelu/relu/silu:  y = fc2(act(fc1(x)))
    swiglu:          y = fc2(silu(gate(x)) * fc1(x))        (fc1 is Llama's up_proj, fc2 its down_proj)

gelu is exact (erf), or with `bias_gelu_fusion: true` the tanh approximation
0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), which is what GPT-NeoX's fused bias+GELU kernel computes
(HF's `gelu_new`). The width is derived.intermediate_size (GPT-NeoX's rule, derive.mlp_widths).

fc1 and gate are column-parallel (each rank holds intermediate/tp of the columns; the gate and up shards
of a rank cover the same columns, so the product is local), fc2 is row-parallel.

With `mlp_chunk_size` c the block runs on c tokens of the sequence at a time: y[i:i+c] = mlp(x[i:i+c]).
The MLP acts on each token alone, so this is exact; each chunk is run under activation checkpointing
(only its input is kept, its `[c, b, intermediate/tp]` activations are recomputed in backward), so the
`[s, b, intermediate/tp]` intermediate never exists whole, forward or backward.

With `mlp_impl: quack` (a GELU MLP, or a SwiGLU MLP without biases; CUDA, no sequence parallelism) fc1 (and
the gate), the activation and fc2's data gradient run as quack GEMMs with the activation in their epilogues
(megatron/model/fused_mlp.py); the input mapping, the reduction and fc2's bias are the same as below. It keeps
fc1's (and the gate's) output only, as `mlp_act` recomputation does, for free.

With `recompute_modules: [mlp_act]` the activation's output (fc2's input) is not kept for fc2's weight
gradient: it is recomputed from fc1's (and the gate's) output, which the activation's own backward keeps
anyway. Saved per layer: 1 x [s, b, intermediate/tp] less (gelu: 1 instead of 2; swiglu: 3 instead of 4). Under sequence
parallelism x is this rank's shard `[s/tp, b, h]`: a chunk of it is gathered (the chunks of every rank,
`[c * tp, b, h]`) and the output reduce-scattered back to the same rows, so chunking composes with SP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.init import WeightInit, resolve_init_seed
from megatron.model.mlp_support import check_mlp_support
from megatron.model.fused_mlp import gelu_mlp, swiglu_mlp
from megatron.mpu.initialize import ParallelState
from megatron.mpu.layers import ColumnParallelLinear, RowParallelLinear
from megatron.mpu.mappings import copy_to_tensor_parallel_region
from megatron.neox_args.derive import GATED_ACTIVATIONS
from megatron.mpu.random import checkpoint
from megatron.neox_args.sections import DerivedArgs, ModelArgs


ACTIVATIONS = {
    "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "softsign": F.softsign, "mish": F.mish,
    # gated: the function applied to the gate branch (GPT-NeoX's geglu uses the exact gelu)
    "swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu, "bilinear": lambda t: t, "glu": torch.sigmoid,
}
"""activation name -> elementwise function (for gated ones: of the gate)."""


class ParallelMLP(nn.Module):
    """x `[s, b, h]` (or `[s/tp, b, h]` under sequence parallelism) -> same shape.

    `init`: the block's random source (megatron/model/init.py); default: prefix "mlp" under
    `torch.initial_seed()`."""

    def __init__(self, model: ModelArgs, derived: DerivedArgs, parallel: ParallelState,
                 dtype: torch.dtype = torch.float32, init: WeightInit | None = None):
        super().__init__()
        if model.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {model.activation!r}")
        if derived.intermediate_size % parallel.tp_size != 0:
            raise ValueError(
                f"intermediate_size {derived.intermediate_size} must be divisible by model_parallel_size "
                f"{parallel.tp_size}"
            )
        self.activation = model.activation
        init = init or WeightInit(resolve_init_seed(None), "mlp")
        self.gelu_approximate = "tanh" if model.bias_gelu_fusion else "none"
        self.chunk_size = model.mlp_chunk_size
        self.fused = model.mlp_impl == "quack"  # checked where it can run: megatron/model/mlp_support.py
        if self.fused:
            check_mlp_support(model, dtype, sequence_parallel=parallel.sequence_parallel and parallel.tp_size > 1,
                              width_per_rank=derived.intermediate_size // parallel.tp_size)
        self.autotune = bool(model.mlp_autotune)  # null resolved at start (device_defaults); unresolved: off
        self.tp_group = parallel.tp_group
        self.recompute_act = False  # set by GPTModel for recompute_modules: [mlp_act]
        column = dict(
            tp_group=parallel.tp_group, bias=model.use_bias_in_mlp, gather_output=False,
            sequence_parallel=parallel.sequence_parallel, params_dtype=dtype,
        )
        h, ffn = model.hidden_size, derived.intermediate_size
        self.linear_fc1 = ColumnParallelLinear(
            h, ffn, init_method=init.fn(model.init_method, model, "linear_fc1.weight"), **column)
        self.linear_gate = None
        if self.activation in GATED_ACTIVATIONS:
            self.linear_gate = ColumnParallelLinear(
                h, ffn, init_method=init.fn(model.init_method, model, "linear_gate.weight"), **column)
        self.linear_fc2 = RowParallelLinear(
            ffn, h, tp_group=parallel.tp_group, bias=model.use_bias_in_mlp, input_is_parallel=True,
            sequence_parallel=parallel.sequence_parallel,
            init_method=init.fn(model.output_layer_init_method, model, "linear_fc2.weight"), params_dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_size is None or x.shape[0] <= self.chunk_size:
            return self._mlp(x)
        chunks = []
        for piece in torch.split(x, self.chunk_size, dim=0):  # [c, b, h] views of the (local) sequence
            if torch.is_grad_enabled():
                chunks.append(checkpoint(self._mlp, piece))  # dropout-free: no RNG state to replay
            else:
                chunks.append(self._mlp(piece))
        return torch.cat(chunks, dim=0)

    def _act(self, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        if gate is not None:  # gated: act(gate) * up
            return ACTIVATIONS[self.activation](gate) * up
        if self.activation == "gelu":
            return F.gelu(up, approximate=self.gelu_approximate)  # erf ("gelu") or tanh ("gelu_new")
        return ACTIVATIONS[self.activation](up)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            x = copy_to_tensor_parallel_region(x, self.tp_group)  # [s, b, h], as linear_fc1 does
            if self.linear_gate is not None:  # swiglu: silu(gate(x)) * fc1(x)
                partial = swiglu_mlp(x, self.linear_gate.weight, self.linear_fc1.weight, self.linear_fc2.weight,
                                     self.autotune)  # [s, b, h], this rank's share of fc2's sum
            else:
                partial = gelu_mlp(x, self.linear_fc1.weight, self.linear_fc1.bias, self.linear_fc2.weight,
                                   self.gelu_approximate, self.autotune)
            return self.linear_fc2.reduce_partial(partial)
        up = self.linear_fc1(x)  # [s, b, ffn/tp]
        gate = self.linear_gate(x) if self.linear_gate is not None else None
        inner = self._act(up, gate)
        if self.recompute_act and torch.is_grad_enabled():
            # fc2 keeps its input for its weight gradient: keep a recipe instead (the activation's own
            # inputs, which autograd keeps for the activation's backward anyway) and recompute it then
            with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(inner, lambda: self._act(up, gate))):
                return self.linear_fc2(inner)
        return self.linear_fc2(inner)  # [s, b, h] or [s/tp, b, h]


def _recompute_hooks(target: torch.Tensor, recompute):
    """saved_tensors_hooks that store, in place of `target` (or a view of all of it), nothing but the
    function that recomputes it; other saved tensors pass through unchanged."""
    ptr, numel = target.untyped_storage().data_ptr(), target.numel()

    def pack(t: torch.Tensor):
        if t.numel() == numel and t.untyped_storage().data_ptr() == ptr and t.is_contiguous():
            return ("recompute", t.shape)
        return t

    def unpack(packed):
        if isinstance(packed, tuple) and packed and packed[0] == "recompute":
            with torch.no_grad():
                return recompute().reshape(packed[1])
        return packed

    return pack, unpack
