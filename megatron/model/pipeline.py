"""The GPT model as DeepSpeed pipeline stages: the same blocks as `GPTModel`, listed as layer specs.

    spec 0          embedding        tokens [b, s] -> x [s, b, h] (or [s/tp, b, h] under SP)
    spec 1 + i      TransformerLayer(layer_index=i) (the global index, 0 .. num_layers-1), x -> x
    spec L + 1      final norm       x -> x
    spec L + 2      output head      x -> x; `PipelineLoss` then computes the loss from x on the last stage
                                     (fused or vocab-parallel cross entropy, as GPTModel.loss_from_hidden)

With tied embeddings (no_weight_tying false) specs 0 and L + 2 are one `TiedLayerSpec` ("embed"): the first
stage holds the embedding, the last a copy of its word-embedding weight (`EmbeddingPipe(head_only=True)`);
DeepSpeed broadcasts stage 0's weight to the copy at build time and sums the two gradients over the
tied group before every step (`allreduce_tied_weight_gradients`), so both copies take identical updates.
The copy carries `ds_pipe_replicated`: gradient norms count it once.

Stages are cut by `pipe_partition_method` (DeepSpeed's): "type:transformer" and GPT-NeoX's default
"type:transformer|mlp" (the same cut: no stage layer here is an MLP of its own) balance the transformer layers
(the embedding lands on the first stage, norm and head on the last), "parameters" balances parameter
counts, "uniform" the number of specs. Activation checkpointing recomputes chunks of
`checkpoint_num_layers` specs of transformer layers (`mpu.random.checkpoint`, dropout replayed).
The modules ARE GPTModel's (`TransformerLayer`, whose class name "type:transformer" matches; the embedding,
norm and output head as GPTModel builds them), the loss reuses GPTModel's methods, and every weight is
drawn from the generator of its global name (megatron/model/init.py): PP=1 and PP>1 start from the same
weights and compute the same function.

State dicts: DeepSpeed writes one file per spec (`layer_{spec:02d}-model_{tp:02d}-model_states.pt`);
`gpt_key(spec, key)` / `pipeline_key(gpt_key)` map between those and GPTModel's state-dict keys.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from megatron.model.gpt import (DTYPES, Embedding, GPTModel, TransformerLayer, build_output_layer, compile_options,
                                real_vocab_size)
from megatron.model.init import resolve_init_seed
from megatron.model.norms import build_norm
from megatron.model.positional import share_rotary_tables
from megatron.mpu.initialize import ParallelState
from megatron.neox_args.sections import DerivedArgs, ModelArgs

TIED_KEY = "embed"
TIED_WEIGHT = "word_embeddings.weight"
PARTITION_METHODS = ("type:transformer|mlp", "type:transformer", "parameters", "uniform")


class EmbeddingPipe(Embedding):
    """GPTModel's `Embedding`; with `head_only` (the last stage's tied copy) without position embeddings
    (built the same way, then dropped: the copy needs only the word-embedding weight)."""

    def __init__(self, model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, dtype: torch.dtype,
                 init_seed: int, head_only: bool = False):
        super().__init__(model, derived, parallel, dtype, init_seed=init_seed)
        if head_only:
            self.position_embeddings = None


class FinalNormPipe(nn.Module):
    """GPTModel's `final_norm` (state-dict key `final_norm.*`)."""

    def __init__(self, model: ModelArgs, parallel: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.final_norm = build_norm(model, parallel.sequence_parallel, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)


class OutputLayerPipe(nn.Module):
    """GPTModel's untied `output_layer` (key `output_layer.weight`); forward passes x on to `PipelineLoss`,
    which applies it together with the cross entropy (the logits need the labels to stay unmaterialized)."""

    def __init__(self, model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, dtype: torch.dtype,
                 init_seed: int):
        super().__init__()
        self.output_layer = build_output_layer(model, derived, parallel, dtype, init_seed=init_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _tied_head_forward(module: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """The tied copy on the last stage in the layer sequence: x passes on to `PipelineLoss`."""
    return x


class _Head:
    """The output head and loss of the last stage, computed by GPTModel's own methods (`loss_from_hidden`,
    `output_logits`, `_output_input`, `output_weight`) over the stage's head weight."""

    output_weight = GPTModel.output_weight
    _output_input = GPTModel._output_input
    output_logits = GPTModel.output_logits
    loss_from_hidden = GPTModel.loss_from_hidden

    def __init__(self, model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, embedding=None,
                 output_layer=None):
        self.parallel = parallel
        self.vocab_size = real_vocab_size(derived)  # ids >= it are padding: no probability
        self.fused_cross_entropy = model.fused_cross_entropy
        self.cross_entropy_chunk_size = model.cross_entropy_chunk_size
        self.embedding = embedding
        self.output_layer = output_layer


class PipelineLoss:
    """`loss_fn(x, (labels, loss_mask))` of the PipelineModule: x [s, b, h] (final-norm output, or
    [s/tp, b, h] under SP), labels/loss_mask [b, s] -> the scalar loss GPTModel returns for them.
    `bind(module)` points it at the last stage's head weight after the stages are built."""

    def __init__(self, model: ModelArgs, derived: DerivedArgs, parallel: ParallelState):
        self.model = model
        self.derived = derived
        self.parallel = parallel
        self.head = None

    def bind(self, module) -> None:
        if not model_is_tied(self.model):
            heads = [f for f in module.forward_funcs if isinstance(f, OutputLayerPipe)]
            self.head = (_Head(self.model, self.derived, self.parallel, output_layer=heads[0].output_layer)
                         if heads else None)
        elif TIED_KEY in module.tied_modules:
            self.head = _Head(self.model, self.derived, self.parallel, embedding=module.tied_modules[TIED_KEY])

    def __call__(self, x: torch.Tensor, labels) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("PipelineLoss runs on the last pipeline stage only")
        labels, loss_mask = labels
        return self.head.loss_from_hidden(x, labels, loss_mask)


def model_is_tied(model: ModelArgs) -> bool:
    return not model.no_weight_tying


def layer_specs(model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, dtype: torch.dtype,
                init_seed: int) -> list:
    """The spec list of the module docstring (DeepSpeed LayerSpec / TiedLayerSpec); every block keyed by
    its global name under `init_seed` (megatron/model/init.py), so the stages start from PP=1's weights."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = []
    if model_is_tied(model):
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, model, derived, parallel, dtype, init_seed,
                                   tied_weight_attr=[TIED_WEIGHT]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, model, derived, parallel, dtype, init_seed))
    specs += [LayerSpec(TransformerLayer, model, derived, parallel, dtype, layer_index=i, init_seed=init_seed)
              for i in range(model.num_layers)]
    specs.append(LayerSpec(FinalNormPipe, model, parallel, dtype))
    if model_is_tied(model):
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, model, derived, parallel, dtype, init_seed,
                                   head_only=True, forward_fn=_tied_head_forward, tied_weight_attr=[TIED_WEIGHT]))
    else:
        specs.append(LayerSpec(OutputLayerPipe, model, derived, parallel, dtype, init_seed))
    return specs


def deepspeed_topology(parallel: ParallelState):
    """DeepSpeed's PipeModelDataParallelTopology for our degrees (axes pipe, data, model; model fastest),
    the same rank layout as `mpu.initialize` (tests/distributed/test_pipeline.py compares every rank)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=parallel.pp_size, num_mp=parallel.tp_size, num_dp=parallel.dp_size)


def _checkpoint_func(checkpoint, parallel: ParallelState, partition_activations: bool):
    """mpu.random.checkpoint, keeping each tensor rank's 1/tp slice of a chunk's [s, b, h] input with
    partition_activations (as GPTModel does; not under sequence parallelism, where it is already a shard)."""
    if not partition_activations or parallel.sequence_parallel or parallel.tp_size == 1:
        return checkpoint
    import functools

    return functools.partial(checkpoint, partition_group=parallel.tp_group)


def build_pipeline_model(model: ModelArgs, derived: DerivedArgs, parallel: ParallelState, precision: str = "fp32",
                         *, partition_method: str = "type:transformer|mlp", checkpoint_activations: bool = False,
                         checkpoint_num_layers: int = 1, torch_compile: bool = False, compile_mode: str = "default",
                         init_seed: int | None = None, partition_activations: bool = False):
    """This rank's stage of the GPT model: a DeepSpeed `PipelineModule` over `layer_specs` (needs
    torch.distributed and `parallel` from `mpu.initialize_model_parallel` with pp_size > 1). The keyword
    flags are GPTModel's (`torch_compile` compiles each transformer layer in place, in `compile_mode`)."""
    from deepspeed.pipe import PipelineModule

    from megatron.mpu.random import checkpoint

    if partition_method not in PARTITION_METHODS:
        raise ValueError(f"pipe_partition_method must be one of {PARTITION_METHODS}, got {partition_method!r}")
    loss = PipelineLoss(model, derived, parallel)
    module = PipelineModule(
        layers=layer_specs(model, derived, parallel, DTYPES[precision], resolve_init_seed(init_seed)),
        topology=deepspeed_topology(parallel), loss_fn=loss, partition_method=partition_method,
        activation_checkpoint_interval=checkpoint_num_layers if checkpoint_activations else 0,
        activation_checkpoint_func=_checkpoint_func(checkpoint, parallel, partition_activations),
        checkpointable_layers=[TransformerLayer.__name__])
    loss.bind(module)
    share_rotary_tables(module.forward_funcs)  # this stage's layers
    if torch_compile:
        for layer in module.forward_funcs:
            if isinstance(layer, TransformerLayer):
                layer.compile(**compile_options(compile_mode))  # in place: parameter names are unchanged
    return module


# --- state-dict keys: one file per spec <-> GPTModel ----------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def gpt_key(spec: int, key: str, num_layers: int) -> str:
    """The GPTModel key of `key` in spec `spec`'s state dict."""
    if spec == 0:
        return f"embedding.{key}"
    if 1 <= spec <= num_layers:
        return f"layers.{spec - 1}.{key}"
    if spec in (num_layers + 1, num_layers + 2):
        return key  # final_norm.* / output_layer.weight
    raise KeyError(f"spec {spec} is outside the {num_layers + 3} specs of the pipeline model")


def pipeline_key(key: str, num_layers: int) -> tuple[int, str]:
    """(spec, key within the spec's state dict) of a GPTModel key (inverse of `gpt_key`)."""
    if key.startswith("embedding."):
        return 0, key[len("embedding."):]
    match = _LAYER.fullmatch(key)
    if match:
        return 1 + int(match.group(1)), match.group(2)
    if key.startswith("final_norm."):
        return num_layers + 1, key
    if key.startswith("output_layer."):
        return num_layers + 2, key
    raise KeyError(f"{key!r} is not a GPTModel state-dict key")


def split_gpt_state(state: dict, num_layers: int) -> dict[int, dict]:
    """GPTModel state dict -> {spec: that spec's state dict} (what DeepSpeed's per-layer files hold)."""
    per_spec: dict[int, dict] = {}
    for key, value in state.items():
        spec, inner = pipeline_key(key, num_layers)
        per_spec.setdefault(spec, {})[inner] = value
    return per_spec


def merge_spec_states(per_spec: dict[int, dict], num_layers: int) -> dict:
    """{spec: state dict} -> GPTModel state dict (inverse of `split_gpt_state`)."""
    return {gpt_key(spec, key, num_layers): value for spec, state in sorted(per_spec.items())
            for key, value in state.items()}


def load_gpt_state(module, state: dict, num_layers: int) -> None:
    """Copy a GPTModel state dict (this tensor rank's shard) into this stage's modules (tests, finetune
    into another pipeline size); the tied copy on the last stage takes the embedding weight."""
    per_spec = split_gpt_state(state, num_layers)
    with torch.no_grad():
        for name, child in module.named_children():
            if name.isdigit():
                child.load_state_dict(per_spec[int(name)])
        for copy in module.tied_modules.values():
            own = copy.state_dict()
            copy.load_state_dict({key: per_spec[0][key] for key in own})
