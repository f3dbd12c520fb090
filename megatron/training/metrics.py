"""Throughput metrics: model FLOPs per token, peak device FLOP/s, tokens/s, TFLOP/s, MFU and ETA.

Everything here is plain arithmetic on numbers the caller gives; nothing synchronizes a GPU. The
`ThroughputMeter` reads a wall clock (`time.perf_counter` unless told otherwise) between logging points,
which is accurate over a logging interval because the trainer already waits for the loss there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional


def count_non_embedding_params(model_args, derived) -> int:
    """Parameters that take part in per-token matmuls: every weight and bias except the input embedding.

    Counted from the config, not from a built model, so it is the same on every tensor-parallel rank:

    - per layer: QKV projection `h x (h + 2 * kv_heads * head_dim)` (grouped-query attention shrinks K and
      V), attention output `h x h`, MLP `2 * h x I` (gelu/relu) or `3 * h x I` (swiglu: gate, up, down),
      their biases when enabled, and two norms (weight, plus bias for LayerNorm with `use_bias_in_norms`);
    - the final norm;
    - the output layer `h x V` (padded vocab). With tied embeddings the output matmul still runs every
      token, so its `h x V` is counted here too.

    Learned position embeddings are a lookup, not a matmul, and are left out like the token embedding.
    """
    h = model_args.hidden_size
    heads = model_args.num_attention_heads
    kv_heads = derived.num_kv_heads
    head_dim = h // heads
    inner = derived.intermediate_size
    vocab = derived.padded_vocab_size
    if vocab <= 0:
        raise ValueError(
            "derived.padded_vocab_size is not set; call NeoXArgs.set_vocab_size(tokenizer.vocab_size) "
            "before computing FLOPs."
        )

    qkv_out = h + 2 * kv_heads * head_dim
    attention = h * qkv_out + h * h
    if model_args.use_bias_in_attn_linear:
        attention += qkv_out + h

    if model_args.activation == "swiglu":
        mlp = 3 * h * inner
        mlp_bias = 2 * inner + h
    else:
        mlp = 2 * h * inner
        mlp_bias = inner + h
    if model_args.use_bias_in_mlp:
        mlp += mlp_bias

    norm_has_bias = model_args.norm == "layernorm" and model_args.use_bias_in_norms
    one_norm = 2 * h if norm_has_bias else h

    per_layer = attention + mlp + 2 * one_norm
    return model_args.num_layers * per_layer + one_norm + h * vocab


def flops_per_token(model_args, derived, seq_length: int) -> float:
    """Model FLOPs to train on one token (forward + backward): `6 * N + 12 * L * h * s`.

    `N` is `count_non_embedding_params`. Each parameter costs 2 FLOPs (multiply, add) per token in the
    forward pass and 4 in the backward pass (gradients of inputs and of weights): 6N. Attention scores
    `Q K^T` and the weighted sum `A V` are matmuls without parameters: 2 * 2 * s * h FLOPs per token per
    layer forward, times 3 for forward + backward: 12 * L * h * s (causal masking is not discounted).
    This is the accounting of Megatron-LM (Narayanan et al. 2021) and PaLM (Chowdhery et al. 2022, app. B).

    With activation checkpointing the hardware runs part of the forward again, but MFU counts model
    FLOPs only, so the recomputation is deliberately not included.
    """
    n = count_non_embedding_params(model_args, derived)
    return 6.0 * n + 12.0 * model_args.num_layers * model_args.hidden_size * seq_length


PEAK_BF16_DENSE_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM (HBM3); torch reports e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)
"""Datasheet peak dense (no sparsity) bf16 tensor FLOP/s by device-name substring, most specific first."""


def default_peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device whose name contains a known model, else None.

    Matching is case-insensitive on substrings of `torch.cuda.get_device_name()` (e.g. "NVIDIA H100 80GB
    HBM3" -> 989e12). CPUs and unknown devices return None: their peak depends on cores, clock and vector
    width, so MFU is shown as n/a rather than as a made-up percentage (set `peak_flops_per_device` to get one).
    """
    if not device_name:
        return None
    upper = device_name.upper()
    for key, flops in PEAK_BF16_DENSE_FLOPS:
        if key in upper:
            return flops
    return None


@dataclass
class ThroughputStats:
    """Throughput over the last logging interval, plus progress of the whole run."""

    iteration: int
    step_time_s: float
    """Mean seconds per optimizer step in the last interval."""
    tokens_per_s: float
    """Global tokens per second (all ranks) in the last interval."""
    tflops_per_device: float
    """Model TFLOP/s achieved by one device in the last interval."""
    mfu: Optional[float]
    """Model FLOPs utilization as a fraction (0.381 = 38.1%); None when the device peak is unknown."""
    eta_s: Optional[float]
    """Seconds left, from the mean step time since the meter started; None when total_iters is unknown."""
    elapsed_s: float
    """Seconds since the meter started."""


class ThroughputMeter:
    """Turns (iteration, time) pairs at logging points into tokens/s, TFLOP/s per device, MFU and ETA.

    Call `update(iteration)` at each logging point; the interval since the previous call (or `mark`) is
    timed with `clock`, unless the caller passes `interval_s` it measured itself (e.g. with CUDA events).
    Call `mark(iteration)` after work that is not training (evaluation, checkpointing) so that it does not
    count against the next interval's throughput; it still counts in elapsed time and the ETA.
    """

    def __init__(
        self,
        *,
        tokens_per_step: int,
        flops_per_token: float,
        num_devices: int,
        peak_flops_per_device: Optional[float] = None,
        total_iters: Optional[int] = None,
        start_iteration: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if tokens_per_step <= 0 or num_devices <= 0:
            raise ValueError(
                f"tokens_per_step ({tokens_per_step}) and num_devices ({num_devices}) must be positive."
            )
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self.total_iters = total_iters
        self._clock = clock
        self._start_time = clock()
        self._start_iteration = start_iteration
        self._last_time = self._start_time
        self._last_iteration = start_iteration

    def mark(self, iteration: int) -> None:
        """Start a new interval at `iteration` now, without reporting the time since the last one."""
        self._last_time = self._clock()
        self._last_iteration = iteration

    def update(self, iteration: int, interval_s: Optional[float] = None) -> ThroughputStats:
        """Report the interval from the last `update`/`mark` up to `iteration` (which must have advanced)."""
        now = self._clock()
        steps = iteration - self._last_iteration
        if steps <= 0:
            raise ValueError(
                f"iteration {iteration} is not after the previous logging point {self._last_iteration}."
            )
        if interval_s is None:
            interval_s = now - self._last_time
        interval_s = max(interval_s, 1e-9)
        self._last_time = now
        self._last_iteration = iteration

        step_time = interval_s / steps
        tokens_per_s = self.tokens_per_step / step_time
        flops_per_device = tokens_per_s * self.flops_per_token / self.num_devices
        mfu = None
        if self.peak_flops_per_device:
            mfu = flops_per_device / self.peak_flops_per_device

        elapsed = now - self._start_time
        eta = None
        done = iteration - self._start_iteration
        if self.total_iters is not None and done > 0:
            eta = max(self.total_iters - iteration, 0) * (elapsed / done)
        return ThroughputStats(
            iteration=iteration,
            step_time_s=step_time,
            tokens_per_s=tokens_per_s,
            tflops_per_device=flops_per_device / 1e12,
            mfu=mfu,
            eta_s=eta,
            elapsed_s=elapsed,
        )
