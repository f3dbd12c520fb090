"""Throughput metrics: model FLOPs per token, peak device FLOP/s, tokens/s, TFLOP/s, MFU and ETA.

Everything here is plain arithmetic on numbers the caller gives; nothing synchronizes a GPU. The
`ThroughputMeter` reads a wall clock (`time.perf_counter` unless told otherwise) between logging points,
which is accurate over a logging interval because the trainer already waits for the loss there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Optional

from megatron.neox_args.derive import GATED_ACTIVATIONS


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

    if model_args.activation in GATED_ACTIVATIONS:
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


def flops_per_token(model_args, derived, seq_length: int, causal: bool = False) -> float:
    """Model FLOPs to train on one token (forward + backward).

    Full score matrix (Megatron-LM, Narayanan et al. 2021; PaLM, Chowdhery et al. 2022, app. B), the default:

        F_full   = 6 * N + 12 * L * h * s

    `N` is `count_non_embedding_params`. Each parameter costs 2 FLOPs (multiply, add) per token in the
    forward pass and 4 in the backward pass (gradients of inputs and of weights): 6N. Attention scores
    `Q K^T` and the weighted sum `A V` are matmuls without parameters: with every query against all `s`
    keys that is 2 * 2 * s * h FLOPs per token per layer forward, times 3 for forward + backward:
    12 * L * h * s.

    Causal (`causal=True`): a causal kernel computes only the lower triangle of the score matrix, on
    average s/2 keys per query, so the attention term halves:

        F_causal = 6 * N + 6 * L * h * s

    (the diagonal's extra half key per query, s/2 + 1/2, is left out: it is 1/s of the term). This is the
    work a causal flash kernel actually does; at 128k tokens the attention term dominates, so MFU by
    F_full overstates the useful work nearly twice. Sliding windows and document-aware masking do less
    still; neither figure discounts them.

    With activation checkpointing the hardware runs part of the forward again, but MFU counts model
    FLOPs only, so the recomputation is deliberately not included in either.
    """
    n = count_non_embedding_params(model_args, derived)
    attention = (6.0 if causal else 12.0) * model_args.num_layers * model_args.hidden_size * seq_length
    return 6.0 * n + attention


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


@dataclass(frozen=True)
class ThroughputStats(Mapping):
    """Throughput over the last logging interval, plus progress of the whole run.

    Also a read-only mapping of its fields except `iteration` (`record.update(stats)` merges the values
    into a log record).
    """

    iteration: int
    step_time_s: float
    """Mean seconds per optimizer step in the last interval."""
    tokens_per_s: float
    """Global tokens per second (all ranks) in the last interval."""
    tflops_per_device: float
    """Model TFLOP/s achieved by one device in the last interval."""
    mfu: Optional[float]
    """Model FLOPs utilization as a fraction (0.381 = 38.1%), FLOPs counted with the full score matrix
    (Megatron/PaLM, `flops_per_token`); None when the device peak is unknown."""
    eta_s: Optional[float]
    """Seconds left: remaining iterations times the mean step time so far; None without total_iters."""
    elapsed_s: float
    """Seconds since the meter was created."""
    tflops_per_device_causal: Optional[float] = None
    """As tflops_per_device with causal attention counted as half the score matrix (6N + 6 L h s)."""
    mfu_causal: Optional[float] = None
    """MFU from tflops_per_device_causal; None when the device peak is unknown."""

    def _keys(self) -> tuple:
        return tuple(f.name for f in fields(self) if f.name != "iteration")

    def __getitem__(self, key: str):
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


class ThroughputMeter:
    """Turns (iteration, step time) at logging points into tokens/s, TFLOP/s per device, MFU and ETA.

    Both FLOP conventions are reported: `flops_per_token` (full score matrix) gives tflops_per_device and
    mfu, `flops_per_token_causal` (default: the same number) gives tflops_per_device_causal and mfu_causal.

    Call `update(iteration, step_time_s)` at each logging point with the mean seconds per step the caller
    measured over the interval (synchronizing the device first if it wants exact numbers), or
    `update(iteration)` to let the meter time the interval since the previous `update`/`mark` with `clock`.
    Call `mark(iteration)` after work that is not training (evaluation, checkpointing) so the clock-timed
    interval that follows does not include it. The ETA uses the mean training step time so far, so pauses
    for evaluation and checkpoints are not in it.
    """

    def __init__(
        self,
        *,
        tokens_per_step: int,
        flops_per_token: float,
        num_devices: int,
        flops_per_token_causal: Optional[float] = None,
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
        self.flops_per_token_causal = flops_per_token if flops_per_token_causal is None else flops_per_token_causal
        self.num_devices = num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self.total_iters = total_iters
        self._clock = clock
        self._start_time = clock()
        self._last_time = self._start_time
        self._last_iteration = start_iteration
        self._timed_steps = 0
        self._timed_seconds = 0.0

    @classmethod
    def for_run(cls, args, device_type: str, start_iteration: int = 0) -> "ThroughputMeter":
        """A meter for a resolved NeoXArgs (after `set_vocab_size`) on `device_type` ("cuda" or "cpu").

        The peak is `logging.peak_flops_per_device` when set, else `default_peak_flops` of the GPU's name
        (None on CPU: MFU shown as n/a).
        """
        peak = args.logging.peak_flops_per_device
        if peak is None and device_type == "cuda":
            import torch

            peak = default_peak_flops(torch.cuda.get_device_name())
        seq_length = args.model.seq_length
        return cls(
            tokens_per_step=args.derived.train_batch_size * seq_length,
            flops_per_token=flops_per_token(args.model, args.derived, seq_length),
            flops_per_token_causal=flops_per_token(args.model, args.derived, seq_length, causal=True),
            num_devices=args.derived.world_size,
            peak_flops_per_device=peak,
            total_iters=args.training.train_iters,
            start_iteration=start_iteration,
        )

    def mark(self, iteration: int) -> None:
        """Start a new interval at `iteration` now, without reporting the time since the last one."""
        self._last_time = self._clock()
        self._last_iteration = iteration

    def update(self, iteration: int, step_time_s: Optional[float] = None) -> ThroughputStats:
        """Report the interval from the last `update`/`mark` up to `iteration` (which must have advanced).

        `step_time_s`: mean seconds per step measured by the caller; None times the interval with the clock.
        """
        now = self._clock()
        steps = iteration - self._last_iteration
        if steps <= 0:
            raise ValueError(
                f"iteration {iteration} is not after the previous logging point {self._last_iteration}."
            )
        if step_time_s is None:
            step_time_s = (now - self._last_time) / steps
        step_time_s = max(step_time_s, 1e-12)
        self._last_time = now
        self._last_iteration = iteration
        self._timed_steps += steps
        self._timed_seconds += steps * step_time_s

        tokens_per_s = self.tokens_per_step / step_time_s
        flops_per_device = tokens_per_s * self.flops_per_token / self.num_devices
        causal_per_device = tokens_per_s * self.flops_per_token_causal / self.num_devices
        peak = self.peak_flops_per_device
        mfu = flops_per_device / peak if peak else None
        mfu_causal = causal_per_device / peak if peak else None
        eta = None
        if self.total_iters is not None:
            mean_step = self._timed_seconds / self._timed_steps
            eta = max(self.total_iters - iteration, 0) * mean_step
        return ThroughputStats(
            iteration=iteration,
            step_time_s=step_time_s,
            tokens_per_s=tokens_per_s,
            tflops_per_device=flops_per_device / 1e12,
            mfu=mfu,
            tflops_per_device_causal=causal_per_device / 1e12,
            mfu_causal=mfu_causal,
            eta_s=eta,
            elapsed_s=now - self._start_time,
        )
