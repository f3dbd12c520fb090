"""The GPT-NeoX / Llama-style decoder, read top to bottom like single-device code.

    tokens [b, s] -> embedding [s, b, h] -> num_layers x TransformerLayer -> final norm
                  -> output head -> logits [b, s, padded_vocab/tp]          (forward(tokens))
                  -> output head + cross entropy -> scalar loss             (forward(tokens, labels, loss_mask))

With labels the loss is computed in the sequence-first layout (labels and mask are transposed to [s, b],
never the logits), and by default (`fused_cross_entropy`) the output projection and the loss run chunk by
chunk over tokens (`mpu.fused_linear_cross_entropy`): the full logits are never materialized.

Initialization (megatron/model/init.py): every random weight is drawn full and unpadded from a generator
keyed by the seed and its state-dict name in this whole model, so the same config and seed give the same
model at any tensor/pipeline size and vocabulary padding. A pipeline stage builds the same blocks
(`Embedding`, `TransformerLayer(layer_index=<global index>)`, `build_output_layer`) with the same seed.
The padded vocabulary rows (ids >= derived.vocab_size, there for even TP shards) are zero, never looked up,
and excluded from the softmax: the losses ignore them and `forward(tokens)` returns -inf for them.

Tensor parallelism comes only from the mpu layers it is built from (column/row-parallel linears,
the vocab-parallel embedding); each rank holds `num_local_heads` heads and `intermediate_size/tp` MLP
columns. Under sequence parallelism the residual stream (embedding output, norms, dropout, residual
adds) is the local sequence shard `[s/tp, b, h]`; column-parallel layers all-gather it and row-parallel
layers reduce-scatter back to it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.attention import ParallelSelfAttention
from megatron.model.init import WeightInit, resolve_init_seed
from megatron.model.mlp import ParallelMLP
from megatron.model.norms import build_norm
from megatron.model.offload import offloaded_checkpoint
from megatron.model.positional import LearnedPositionEmbedding, share_rotary_tables
from megatron.mpu.cross_entropy import mask_padded_vocab, vocab_parallel_cross_entropy
from megatron.mpu.fused_cross_entropy import fused_linear_cross_entropy
from megatron.mpu.initialize import ParallelState
from megatron.mpu.layers import ColumnParallelLinear, VocabParallelEmbedding, mark_sequence_parallel_param
from megatron.mpu.mappings import copy_to_tensor_parallel_region, gather_from_sequence_parallel_region
from megatron.mpu.random import checkpoint, get_rng_tracker
from megatron.neox_args.sections import DerivedArgs, ModelArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hidden_dropout(x: torch.Tensor, p: float, training: bool, sequence_parallel: bool) -> torch.Tensor:
    """Dropout on the residual stream. Replicated activations use the default RNG (same mask on every
    tensor rank); sequence-sharded ones (SP) draw from the tensor-rank stream (a different mask per shard)."""
    if not training or p == 0.0:
        return x
    rng = get_rng_tracker().fork() if sequence_parallel else contextlib.nullcontext()
    with rng:
        return F.dropout(x, p=p, training=True)


def real_vocab_size(derived: DerivedArgs) -> int:
    """The tokenizer's vocabulary (ids below it are real); every padded row counts when it is unknown (0)."""
    return derived.vocab_size if 0 < derived.vocab_size <= derived.padded_vocab_size else derived.padded_vocab_size


class Embedding(nn.Module):
    """tokens [b, s] -> [s, b, h] (or this rank's sequence shard [s/tp, b, h] under SP).

    Weights keyed "embedding.word_embeddings.weight" / "embedding.position_embeddings.weight" under
    `init_seed` (None: `torch.initial_seed()`), as in the whole model; padding rows zero."""

    def __init__(self, model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, dtype: torch.dtype,
                 *, init_seed: int | None = None):
        super().__init__()
        self.parallel = parallel
        self.dropout = model.hidden_dropout
        init = WeightInit(resolve_init_seed(init_seed), "embedding")
        self.word_embeddings = VocabParallelEmbedding(
            derived.padded_vocab_size, model.hidden_size, tp_group=parallel.tp_group,
            init_method=init.fn(model.init_method, model, "word_embeddings.weight"),
            sequence_parallel=parallel.sequence_parallel, params_dtype=dtype, vocab_size=real_vocab_size(derived),
        )
        self.position_embeddings = None
        if model.pos_emb == "learned":
            self.position_embeddings = LearnedPositionEmbedding(
                derived.max_position_embeddings, model.hidden_size,
                init.fn(model.init_method, model, "position_embeddings.weight"), dtype=dtype
            )
            if parallel.sequence_parallel:  # each rank adds only its shard's positions
                mark_sequence_parallel_param(self.position_embeddings.weight)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s]; position_ids int64 [b, s] (full sequence) or None for 0..s-1."""
        x = self.word_embeddings(tokens.t())  # [s, b, h] or [s/tp, b, h]
        if self.position_embeddings is not None:
            offset = self.parallel.tp_rank * x.shape[0] if self.parallel.sequence_parallel else 0
            if position_ids is None:
                x = x + self.position_embeddings(x.shape[0], offset)  # [s_local, 1, h] broadcast over b
            else:  # this rank's columns of the full-sequence positions
                x = x + self.position_embeddings.at(position_ids[:, offset:offset + x.shape[0]].t())
        return hidden_dropout(x, self.dropout, self.training, self.parallel.sequence_parallel)


def compile_options(compile_mode: str) -> dict:
    """torch.compile's keyword arguments for `training.torch_compile_mode` ("default": torch's own default)."""
    return {} if compile_mode == "default" else {"mode": compile_mode}


class TransformerLayer(nn.Module):
    """Pre-norm block; x [s, b, h] (or [s/tp, b, h] under SP) -> same shape.

    sequential:               x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    parallel (gpt_j_residual): x = x + attn(norm1(x)) + mlp(norm2(x))

    `layer_index` is the GLOBAL index of the layer in the model (0-based, whatever pipeline stage builds
    it): its weights are keyed "layers.{layer_index}.*" under `init_seed` (None: `torch.initial_seed()`).
    """

    def __init__(self, model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, dtype: torch.dtype,
                 *, layer_index: int, init_seed: int | None = None):
        super().__init__()
        if not 0 <= layer_index < model.num_layers:
            raise ValueError(f"layer_index {layer_index} must be in [0, num_layers {model.num_layers})")
        init = WeightInit(resolve_init_seed(init_seed), f"layers.{layer_index}")
        sp = parallel.sequence_parallel
        self.layer_index = layer_index
        self.sequence_parallel = sp
        self.gpt_j_residual = model.gpt_j_residual
        self.dropout = model.hidden_dropout
        self.input_norm = build_norm(model, sp, dtype)
        self.attention = ParallelSelfAttention(model, derived, parallel, dtype, init.child("attention"))
        self.post_attention_norm = build_norm(model, sp, dtype)
        self.mlp = ParallelMLP(model, derived, parallel, dtype, init.child("mlp"))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return hidden_dropout(x, self.dropout, self.training, self.sequence_parallel)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        attn = self._dropout(self.attention(self.input_norm(x), position_ids, cu_seqlens, max_seqlen))
        return self._residual_and_mlp(x, attn)

    def _residual_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input x and the (dropped-out) attention block output attn."""
        if self.gpt_j_residual:
            mlp = self._dropout(self.mlp(self.post_attention_norm(x)))
            return x + attn + mlp
        x = x + attn
        return x + self._dropout(self.mlp(self.post_attention_norm(x)))

    # The same layer in three pieces, for checkpointing that keeps the attention kernel's work
    # (checkpoint_keep_attention): forward == after_attention(x, attention.core_attention(*attention_inputs(x))).
    def attention_inputs(self, x: torch.Tensor, position_ids: torch.Tensor | None = None):
        """x -> (q, k, v), each contiguous `[s, b, heads/tp, d]`: its own storage, so keeping them for the
        attention kernel's backward keeps no view of the fused qkv buffer."""
        q, k, v = self.attention.qkv_heads(self.input_norm(x), position_ids)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def after_attention(self, x: torch.Tensor, core_out: torch.Tensor) -> torch.Tensor:
        """x and the attention kernel's output `[s, b, heads/tp, d]` -> the layer's output."""
        return self._residual_and_mlp(x, self._dropout(self.attention.project(core_out)))


def build_output_layer(model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, dtype: torch.dtype,
                       *, init_seed: int | None = None) -> ColumnParallelLinear:
    """The untied output head `[padded_vocab/tp, h]`, keyed "output_layer.weight"; padding rows zero."""
    init = WeightInit(resolve_init_seed(init_seed), "output_layer")
    return ColumnParallelLinear(
        model.hidden_size, derived.padded_vocab_size, tp_group=parallel.tp_group, bias=False,
        gather_output=False, sequence_parallel=parallel.sequence_parallel,
        init_method=init.fn(model.init_method, model, "weight"), params_dtype=dtype,
        unpadded_out_features=real_vocab_size(derived),
    )


class GPTModel(nn.Module):
    """forward(tokens [b, s]) -> logits [b, s, padded_vocab/tp] (this rank's vocabulary shard; -inf at the
    padding ids >= derived.vocab_size, which take no probability);
    forward(tokens, labels [b, s], loss_mask [b, s] or None) -> scalar loss (mean over unmasked tokens),
    equal to `loss(forward(tokens), labels, loss_mask)` but without the `[b, s, vocab/tp]` logits copy
    and, with `model.fused_cross_entropy`, without materializing the logits at all.

    `init_seed` (None: `torch.initial_seed()`) keys every random weight (megatron/model/init.py): the
    initial weights depend on it and the config only, never on the tensor/pipeline layout or padding.

    Construction flags from TrainingArgs (they change how layers run, never the weights or keys):
    `checkpoint_activations` / `checkpoint_num_layers` recompute chunks of layers in backward
    (`partition_activations`: each tensor rank keeps only its 1/tp slice of a chunk's input)
    (`mpu.random.checkpoint`, dropout masks replayed), with `checkpoint_in_cpu` each chunk's input kept in
    host memory (`model.offload`); `recompute_modules` (`core_attn`, `mlp_act`) recompute those parts of
    every layer only; `torch_compile` compiles each layer in place.

    Document-aware batches (megatron/data/doc_masks.py) add `position_ids` [b, s] (positions restarting
    per document) and `cu_seqlens` int32 [n_docs + 1] + `max_seqlen` (attention within documents), all of
    the full sequence, also under sequence parallelism.
    """

    def __init__(
        self,
        model: ModelArgs,
        derived: DerivedArgs,
        parallel: ParallelState,
        precision: str = "fp32",
        *,
        checkpoint_activations: bool = False,
        checkpoint_num_layers: int = 1,
        partition_activations: bool = False,
        checkpoint_in_cpu: bool = False,
        recompute_modules: tuple = (),
        checkpoint_keep_attention: bool = False,
        torch_compile: bool = False,
        compile_mode: str = "default",
        init_seed: int | None = None,
    ):
        super().__init__()
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        if checkpoint_num_layers < 1:
            raise ValueError(f"checkpoint_num_layers must be >= 1, got {checkpoint_num_layers}")
        if model.cross_entropy_chunk_size < 1:
            raise ValueError(f"cross_entropy_chunk_size must be >= 1, got {model.cross_entropy_chunk_size}")
        dtype = DTYPES[precision]
        self.parallel = parallel
        self.tied = not model.no_weight_tying
        self.checkpoint_activations = checkpoint_activations
        self.checkpoint_num_layers = checkpoint_num_layers
        # the checkpointed [s, b, h] input is replicated over the tensor ranks (not under sequence parallelism,
        # where it is already a [s/tp, b, h] shard): keep 1/tp of it (mpu.random.checkpoint)
        self.partition_group = parallel.tp_group if (partition_activations and not parallel.sequence_parallel) \
            else None
        self.checkpoint_in_cpu = checkpoint_in_cpu
        if checkpoint_keep_attention and (checkpoint_in_cpu or checkpoint_num_layers != 1):
            raise ValueError("checkpoint_keep_attention checkpoints each layer on its own, on the device: it needs "
                             f"checkpoint_num_layers 1 (got {checkpoint_num_layers}) and checkpoint_in_cpu false "
                             f"(got {checkpoint_in_cpu})")
        self.checkpoint_keep_attention = checkpoint_keep_attention
        self.fused_cross_entropy = model.fused_cross_entropy
        self.cross_entropy_chunk_size = model.cross_entropy_chunk_size
        self.vocab_size = real_vocab_size(derived)  # ids >= it are padding: no probability
        seed = resolve_init_seed(init_seed)

        self.embedding = Embedding(model, derived, parallel, dtype, init_seed=seed)
        self.layers = nn.ModuleList(
            TransformerLayer(model, derived, parallel, dtype, layer_index=i, init_seed=seed)
            for i in range(model.num_layers)
        )
        share_rotary_tables(self.layers)
        self.final_norm = build_norm(model, parallel.sequence_parallel, dtype)
        if self.tied:
            self.output_layer = None  # logits through embedding.word_embeddings.weight
        else:
            self.output_layer = build_output_layer(model, derived, parallel, dtype, init_seed=seed)
        if torch_compile and "mlp_act" in recompute_modules:
            from megatron.neox_args.errors import ConfigError

            raise ConfigError("recompute_modules: [mlp_act] with compiled layers (torch_compile true, or unset on "
                              "CUDA): torch.compile already recomputes the MLP activation in backward; drop mlp_act, "
                              "or set torch_compile: false.", key="recompute_modules")
        for layer in self.layers:  # selective recomputation (TrainingArgs.recompute_modules)
            layer.attention.recompute_core = "core_attn" in recompute_modules
            layer.mlp.recompute_act = "mlp_act" in recompute_modules
        if torch_compile:
            options = compile_options(compile_mode)
            for layer in self.layers:
                layer.compile(**options)  # in place: parameter names (checkpoint keys) are unchanged
                if checkpoint_keep_attention:  # the two pieces run around the attention kernel, compiled too
                    layer.attention_inputs = torch.compile(layer.attention_inputs, **options)
                    layer.after_attention = torch.compile(layer.after_attention, **options)

    def _run_layers(self, start: int, end: int, **documents):
        def run(x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers[start:end]:
                x = layer(x, **documents)
            return x

        return run

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        b, s = tokens.shape
        if self.parallel.sequence_parallel and s % self.parallel.tp_size != 0:
            raise ValueError(f"sequence_parallel needs seq_length {s} divisible by model_parallel_size "
                             f"{self.parallel.tp_size}")
        if cu_seqlens is not None and max_seqlen is None:
            raise ValueError("cu_seqlens needs max_seqlen (the longest document, a Python int)")
        documents = dict(position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        x = self.embedding(tokens, position_ids)  # [s, b, h] or [s/tp, b, h]

        n = len(self.layers)
        checkpointing = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        if checkpointing and self.checkpoint_keep_attention:
            for layer in self.layers:
                x = self._layer_keeping_attention(layer, x, position_ids, cu_seqlens, max_seqlen)
        elif checkpointing:
            for start in range(0, n, self.checkpoint_num_layers):
                run = self._run_layers(start, min(start + self.checkpoint_num_layers, n), **documents)
                if self.checkpoint_in_cpu:
                    x = offloaded_checkpoint(run, x)
                else:
                    x = checkpoint(run, x, partition_group=self.partition_group)
        else:
            x = self._run_layers(0, n, **documents)(x)

        x = self.final_norm(x)
        if labels is None:
            logits = mask_padded_vocab(self.output_logits(x), self.parallel.tp_rank, self.vocab_size)
            return logits.transpose(0, 1).contiguous()  # [b, s, padded_vocab/tp], padding ids -inf
        return self.loss_from_hidden(x, labels, loss_mask)

    def _layer_keeping_attention(self, layer: TransformerLayer, x: torch.Tensor, position_ids, cu_seqlens,
                                 max_seqlen) -> torch.Tensor:
        """One layer, checkpointed in two pieces around its attention kernel (checkpoint_keep_attention).

            q, k, v = checkpoint(norm -> qkv projection -> rotary)(x)     kept: x
            o       = attention kernel(q, k, v)                           kept: q, k, v, o, softmax stats
            x'      = checkpoint(output projection -> residual -> MLP)(x, o)

        Backward recomputes both pieces but never the kernel's forward, which at long sequences is most of
        a layer's recompute: per layer, 4 more `[s, b, h]`-sized tensors (fewer with grouped-query
        attention) are kept than with plain checkpointing, for ~1/4 less attention work per step."""
        q, k, v = checkpoint(lambda h: layer.attention_inputs(h, position_ids), x,
                             partition_group=self.partition_group)
        core_out = layer.attention.core_attention(q, k, v, cu_seqlens, max_seqlen)  # [s, b, heads/tp, d]
        return checkpoint(layer.after_attention, x, core_out, partition_group=self.partition_group)

    @property
    def output_weight(self) -> nn.Parameter:
        """The output projection `[padded_vocab/tp, h]`: the embedding weight when tied.

        The loss reads it outside its owning module's forward. Under ZeRO-3, where it is partitioned, the
        DeepSpeed engine gathers it on this access and registers it as an external parameter of this model
        (automatic discovery in the engine's forward); tests/e2e/test_zero_e2e.py checks the losses."""
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def _output_input(self, x: torch.Tensor) -> torch.Tensor:
        """The output head's input, replicated over the tensor group: x [s, b, h] (or [s/tp, b, h] under SP)
        -> [s, b, h]. The head is a column-parallel product, so the gradient of its input is summed over the
        tensor group (copy's backward) or reduce-scattered back to the SP shards (gather's backward)."""
        group = self.parallel.tp_group
        if self.parallel.sequence_parallel:
            return gather_from_sequence_parallel_region(x, group, seq_dim=0)  # [s, b, h]
        return copy_to_tensor_parallel_region(x, group)

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] (or [s/tp, b, h] under SP) -> logits [s, b, padded_vocab/tp]."""
        if self.output_layer is not None:
            return self.output_layer(x)
        # tied: logits = x E^T with E the vocab-parallel embedding
        return F.linear(self._output_input(x), self.embedding.word_embeddings.weight)

    def loss_from_hidden(self, x: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        """Final-norm output x [s, b, h] (or [s/tp, b, h] under SP), labels/loss_mask [b, s] -> scalar loss
        (fp32 mean over unmasked tokens). Labels and mask are transposed to the logits' [s, b] layout."""
        labels = labels.t()  # [s, b]
        mask = torch.ones(labels.shape, device=labels.device) if loss_mask is None else loss_mask.t()
        mask = mask.float()
        if not self.fused_cross_entropy:
            losses = vocab_parallel_cross_entropy(self.output_logits(x), labels, self.parallel.tp_group,
                                                  self.vocab_size)  # [s, b]
            return (losses * mask).sum() / mask.sum().clamp(min=1.0)
        h = self._output_input(x)  # [s, b, h]
        token_weights = mask / mask.sum().clamp(min=1.0)
        return fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.output_weight, labels.reshape(-1), token_weights.reshape(-1),
            self.parallel.tp_group, self.cross_entropy_chunk_size, vocab_size=self.vocab_size,
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Mean vocab-parallel cross entropy over the tokens where loss_mask is nonzero (a scalar, fp32)."""
        losses = vocab_parallel_cross_entropy(logits, labels, self.parallel.tp_group, self.vocab_size)  # [b, s]
        mask = loss_mask.to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)
