"""The baseline: a plain PyTorch training step of transformers' model of the same shape.

Model: `GPTNeoXForCausalLM` (or `LlamaForCausalLM` for RMSNorm/SwiGLU configs) from our converter's
`hf_config` (same hidden size, layers, heads, 4h MLP, rotary fraction, parallel residual, untied head,
padded vocabulary 50304, max positions = seq), `attn_implementation="sdpa"`, built on the device.
Step: fp32 parameters; per micro-batch (`grad_accum` of them), forward under `torch.autocast(bfloat16)` on
cuda (fp32 on cpu) with `labels` (transformers shifts them and computes the mean cross entropy), backward of
loss / grad_accum (gradients sum in the fp32 `.grad`); then `clip_grad_norm_(1.0)`,
`AdamW(fused=True)` step (cuda), `zero_grad(set_to_none=True)`. "compiled" wraps the model in
`torch.compile`. Batches are pre-made from the same synthetic tokens and already on the device, so the
baseline pays no data-loading cost.
"""

from __future__ import annotations

import contextlib

import torch

from bench_data import token_batches
from bench_timing import measure_spec


def build_hf_model(args, device: str):
    """The transformers model of our config on `device`, fp32 parameters, SDPA attention."""
    import transformers

    from megatron.checkpointing.hf import hf_config

    config = hf_config(args.model, args.derived)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                              dtype=torch.float32)
    return model


def run_hf(spec: dict, args, compiled: bool) -> dict:
    """Time the baseline's training step for `spec`; shape and optimizer hyperparameters from NeoXArgs `args`.

    Returns the measurement (bench_timing.measure) plus tokens per step, parameter count and notes.
    """
    device = spec["device"]
    torch.manual_seed(args.training.seed)
    model = build_hf_model(args, device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.optimizer.lr, betas=tuple(args.optimizer.betas),
                                  eps=args.optimizer.eps, weight_decay=args.optimizer.weight_decay,
                                  fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    grad_accum = spec.get("grad_accum", 1)
    n_batches = (spec["warmup"] + spec["steps"] + spec.get("extra_steps", 0)) * grad_accum
    batches = torch.from_numpy(token_batches(spec["data_prefix"], n_batches, spec["micro_batch"], spec["seq"]))
    batches = batches.to(device)  # [n, b, s] int64, all on the device before timing
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else contextlib.nullcontext())
    position = [0]

    def step() -> None:
        for _ in range(grad_accum):
            tokens = batches[position[0] % n_batches]
            position[0] += 1
            with autocast:
                loss = forward(input_ids=tokens, labels=tokens).loss
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.training.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measure_spec(step, spec)
    result.update({
        "tokens_per_step": spec["micro_batch"] * spec["seq"] * grad_accum,
        "params": n_params,
        "notes": ("torch.compile, " if compiled else "") + ("bf16 autocast" if device == "cuda" else "fp32"),
    })
    del forward, model, optimizer, batches
    return result
