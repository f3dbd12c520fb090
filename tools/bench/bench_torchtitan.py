"""The torchtitan baseline: PyTorch's own trainer's Llama model and recipe, at the shape of our config.

Runs only where the optional package `torchtitan` is installed (0.2.2 is the newest release that runs on
torch 2.11; it needs `torchdata`, `datasets`, `tyro` and `tomli` beside it). What is torchtitan's and what is
the bench's:
- model: `torchtitan.models.llama3.Transformer` with its own `init_weights`, built on the meta device and
  materialized on the GPU, as torchtitan's trainer does; SDPA attention, causal mask;
- compile: torchtitan's `apply_compile` (each TransformerBlock compiled with fullgraph=True) and its
  cross-entropy loss compiled, as `compile.enable = true` with components ["model", "loss"] does;
- precision: on one GPU torchtitan applies no FSDP, so `training.mixed_precision_param = bfloat16` becomes
  `torch.autocast("cuda", bfloat16)` over fp32 weights (torchtitan's `maybe_enable_amp`); fp32 on CPU;
- step: torchtitan's loss is a sum over tokens divided by the step's token count; `clip_grad_norm_` with
  foreach, fused AdamW (torchtitan's default `optimizer.implementation = "fused"`), zero_grad(set_to_none).
The training loop around it is the bench's (the same synthetic batches, already on the device, timed like
every other implementation), so no data-loading or logging cost of either trainer enters the figure.

Only Llama-shaped configs map onto torchtitan's model (RMSNorm, SwiGLU, full rotary, no biases, untied
embeddings); any other shape is refused with the reason (`TorchtitanShapeError`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from bench_data import token_batches
from bench_timing import measure_spec


class TorchtitanShapeError(ValueError):
    """Our config has a feature torchtitan's Llama model does not (e.g. LayerNorm, GELU, biases)."""


def ffn_dims(hidden_size: int, intermediate_size: int) -> tuple[float, int]:
    """(ffn_dim_multiplier, multiple_of) that make torchtitan's FeedForward exactly `intermediate_size` wide.

    torchtitan's rule: d = int(2 * 4h / 3); d = int(ffn_dim_multiplier * d); d = multiple_of * ceil(d / multiple_of).
    With multiple_of = intermediate_size and a multiplier that lands d in (0, intermediate_size], the width is
    exactly intermediate_size (checked here, so a rounding surprise cannot silently change the shape).
    """
    base = int(2 * 4 * hidden_size / 3)
    multiplier = intermediate_size / base
    width = int(multiplier * base)
    width = intermediate_size * math.ceil(width / intermediate_size)
    if width != intermediate_size:
        raise TorchtitanShapeError(f"cannot express MLP width {intermediate_size} for hidden {hidden_size} in torchtitan")
    return multiplier, intermediate_size


def torchtitan_model_args(model, derived) -> dict:
    """TransformerModelArgs fields for our ModelArgs `model` (Llama-shaped configs only)."""
    problems = []
    if model.norm != "rmsnorm":
        problems.append(f"norm {model.norm} (torchtitan: RMSNorm)")
    if model.activation != "swiglu":
        problems.append(f"activation {model.activation} (torchtitan: SwiGLU)")
    if model.pos_emb != "rotary" or model.rotary_pct != 1.0:
        problems.append("rotary over every head dimension")
    if model.use_bias_in_attn_linear or model.use_bias_in_mlp:
        problems.append("no biases in attention and MLP")
    if not model.no_weight_tying:
        problems.append("untied embeddings (no_weight_tying: true)")
    if model.gpt_j_residual:
        problems.append("sequential residual (gpt_j_residual: false)")
    if problems:
        raise TorchtitanShapeError("torchtitan's Llama model needs: " + "; ".join(problems))
    multiplier, multiple_of = ffn_dims(model.hidden_size, derived.intermediate_size)
    return {
        "dim": model.hidden_size, "n_layers": model.num_layers, "n_heads": model.num_attention_heads,
        "n_kv_heads": model.num_kv_heads or model.num_attention_heads,
        "vocab_size": derived.padded_vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
        "norm_eps": model.rms_norm_epsilon, "rope_theta": model.rotary_emb_base,
        "max_seq_len": model.seq_length,
    }


def build_torchtitan_model(args, device: str, compiled: bool):
    """torchtitan's Transformer at our shape on `device` (fp32 weights, its own init), blocks compiled."""
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    fields = torchtitan_model_args(args.model, args.derived)
    model_args = TransformerModelArgs(**fields)
    with torch.device("meta"):
        model = Transformer(model_args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device(device))
    if compiled:
        apply_compile(model, Compile(enable=True, components=["model", "loss"], backend="inductor"))
    return model


def run_torchtitan(spec: dict, args) -> dict:
    """Time torchtitan's training step for `spec` (see the module docstring). Returns bench_timing.measure's
    result plus tokens per step, parameter count and notes."""
    from torchtitan.components.loss import cross_entropy_loss

    device = spec["device"]
    torch.manual_seed(args.training.seed)
    model = build_torchtitan_model(args, device, compiled=True)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    loss_fn = torch.compile(cross_entropy_loss, backend="inductor")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.optimizer.lr, betas=tuple(args.optimizer.betas),
                                  eps=args.optimizer.eps, weight_decay=args.optimizer.weight_decay,
                                  fused=device == "cuda")
    grad_accum = spec.get("grad_accum", 1)
    n_batches = (spec["warmup"] + spec["steps"] + spec.get("extra_steps", 0)) * grad_accum
    batches = torch.from_numpy(token_batches(spec["data_prefix"], n_batches, spec["micro_batch"], spec["seq"] + 1))
    batches = batches.to(device)  # [n, b, s + 1] int64: inputs are [:, :-1], labels [:, 1:]
    tokens_per_step = spec["micro_batch"] * spec["seq"] * grad_accum
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext())
    position = [0]

    def step() -> None:
        for _ in range(grad_accum):
            batch = batches[position[0] % n_batches]
            position[0] += 1
            with autocast:
                logits = model(batch[:, :-1])  # [b, s, vocab]
                loss = loss_fn(logits, batch[:, 1:]) / tokens_per_step  # torchtitan: sum / global token count
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.training.gradient_clipping, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measure_spec(step, spec)
    result.update({
        "tokens_per_step": tokens_per_step,
        "params": n_params,
        "notes": "torchtitan llama3, blocks + loss compiled, " + ("bf16 autocast" if device == "cuda" else "fp32"),
    })
    del model, optimizer, batches
    return result
