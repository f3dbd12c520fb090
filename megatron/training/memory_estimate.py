"""Device and host memory of one rank, estimated from the config before anything is allocated.

    python -m megatron.training.memory_estimate configs/6-9B.yml configs/local_setup.yml \
        --set seq_length=131072 --device-gib 139 --host-gib 125 [--vocab 50277]

`estimate_memory(args)` returns a `MemoryEstimate` (bytes per term, device and host); `check_memory`
compares it with what this machine has (`torch.cuda.mem_get_info`, /proc/meminfo `MemAvailable`, both
read before the model is built) and raises a ConfigError with the numbers when a run cannot fit, instead
of the run being killed by the kernel's OOM killer an hour later. train.py calls it on every rank
(`memory_check`, on by default).

The terms, for P parameters on this rank (all of them over the tensor-parallel size t), data-parallel
size d, compute dtype of a bytes (2 in bf16/fp16, 4 in fp32):

  weights            a P on the device (ZeRO-3: a P / d)
  gradients          a P (ZeRO-2/3: a P / d); bf16 with data_types.grad_accum_dtype fp32 at ZeRO-1
                     (DeepSpeed's BF16_Optimizer): 4 P of fp32 sums, plus the bf16 gradients of the
                     micro-batch, all a P of them alive at the end of backward (they are added to their
                     sums after it). By then the checkpointed inputs and the head's activations are
                     freed, so only what a P exceeds those by adds to the peak; with
                     bf16.immediate_grad_update each is added as it is produced and freed, and nothing is
                     added. With free_grad_sums_between_steps (on by default at one micro-batch per
                     step: derive.resolve_free_grad_sums) and one micro-batch per step the 4 P of
                     sums exist only after backward, beside the a P of bf16 gradients but no activations:
                     they add only what a P + 4 P exceeds the activation terms by
  fp32 masters       4 P / d (bf16/fp16 only)       } on the host with offload_optimizer.device cpu,
  Adam states        8 P / d (exp_avg, exp_avg_sq)  } with 4 P / d fp32 gradients and a P / d
                                                      bf16 copy-back buffer there too, and 4 P / d
                                                      that host use grows by in the first backward
                                                      (measured, not itemized: DeepSpeed 0.19 ZeRO-2,
                                                      6.9B on one H200, see below)
  pinned buffers     with offload_optimizer.pin_memory, the masters, fp32 gradients and the bf16 buffer
                     are page-locked; torch's pinned allocator rounds every block up to a power of two
  activations        E = s b h (the micro-batch's residual stream), E_l = E / t under SP:
    no checkpointing:  per layer (replicated part r + sharded part) E a, with r = 2 norm inputs (1 with
                       gpt_j_residual) + 2 column-parallel inputs, /t under SP; sharded part
                       = (qkv width + rotated q, k width + attention output) / h / t
                       + MLP intermediates: 2 ffn/h/t (gelu/relu; 1 with recompute_modules mlp_act, or
                       compiled inside a checkpoint, which recomputes the activation) or 4 ffn/h/t (gated,
                       e.g. swiglu; 3 with mlp_act or compiled without checkpointing, 2 compiled inside a
                       checkpoint), times
                       min(1, mlp_chunk_size / s_l); recompute_modules core_attn drops the attention output
    checkpointing:     ceil(L / k) E_l a for the chunk inputs (on the host with checkpoint_in_cpu,
                       pinned and rounded), plus one chunk of k layers recomputed as above;
                       checkpoint_keep_attention adds per layer what the attention kernel keeps: q, k, v
                       and its output ((2 heads + 2 kv) d / h / t) E a and the fp32 softmax statistics
    always:            3 E a around the layers (embedding output, final norm, gathered head input),
                       2 E a of gradients in flight, the fused cross entropy's two
                       [chunk, V/t] fp32 blocks
  host baseline      4 GiB per rank on GPUs (CUDA context, torch, data-loader workers), 0.5 GiB on CPU:
                     an allowance, not a count

Checked against the issue's measurements on one H200 (1.3B, full checkpointing, compiled: 29.4 / 45.5 /
67.1 GiB peak at 32k / 128k / 256k; 6.9B at 32k, ZeRO-1: 132.2 GiB; without checkpointing at 2k: the llama-1B
shape 39.72, 410M 20.69, 1.3B 63.50 GiB) in tests/unit/training/test_memory_estimate.py, and against the
measured CPU memory of a small fp32 model there (static terms: 205 vs 195 MiB; one layer's saved activations:
within 2% of `layer_activation_elements` for four layer shapes). The offload growth term comes from the host
trace of 6.9B at ZeRO-2 with offload_optimizer {device: cpu, pin_memory: false} on one H200 with a 125 GiB
host (2026-12-01, docs/PERFORMANCE.md): 67 GiB after DeepSpeed's init (masters + fp32 gradients + bf16 buffer
+ baseline, as counted here), +24 GiB (~4 P) during the first backward, then killed at 124.7 GiB while the
Adam states (8 P = 51 GiB) were being written; without the term this estimate said 119 GiB and let it start.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

from megatron.neox_args.errors import ConfigError
from megatron.training.metrics import count_non_embedding_params

GIB = 2**30
HOST_BASELINE_BYTES = {"cuda": 4 * GIB, "cpu": GIB // 2}
"""Allowance per rank for torch's libraries and the data-loader workers (and the CUDA context on GPUs)."""


def pinned_size(nbytes: float) -> float:
    """Bytes torch's pinned host allocator reserves for a block of `nbytes` (next power of two)."""
    return 0.0 if nbytes <= 0 else float(2 ** math.ceil(math.log2(nbytes)))


@dataclass
class MemoryEstimate:
    """Bytes per term on the device and on the host of one rank (see the module docstring)."""

    device: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)

    @property
    def device_bytes(self) -> float:
        return sum(self.device.values())

    @property
    def host_bytes(self) -> float:
        return sum(self.host.values())

    def table(self) -> str:
        lines = []
        for where, terms in (("device", self.device), ("host", self.host)):
            total = sum(terms.values())
            lines.append(f"{where}: {total / GIB:.1f} GiB = " + " + ".join(
                f"{name} {value / GIB:.1f}" for name, value in terms.items() if value > 0))
        return "\n".join(lines)


def total_params(model, derived) -> int:
    """All parameters of the model: the matmul ones of `count_non_embedding_params`, plus the input
    embedding when untied (tied: it is the output layer already counted) and learned positions."""
    n = count_non_embedding_params(model, derived)
    if model.no_weight_tying:
        n += derived.padded_vocab_size * model.hidden_size
    if model.pos_emb == "learned":
        n += derived.max_position_embeddings * model.hidden_size
    return n


def _precision_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def layer_activation_elements(model, derived, tp: int, sequence_parallel: bool, compiled: bool,
                              recompute_modules=(), checkpointed: bool = True, fused_mlp: bool = False) -> float:
    """Elements (in units of E = s b h) autograd keeps for one layer's backward; `recompute_modules` drops
    the attention output (core_attn) or the MLP activation's output (mlp_act). A compiled layer recomputes
    its MLP activation in backward when it runs inside an activation checkpoint (`checkpointed`, the
    recomputed chunk), but keeps one ffn-wide tensor more when it runs without one: measured on one H200
    (2026-12-01, 2k tokens, bf16, no checkpointing: llama-1B shape 39.72 GiB, 410M 20.69, 1.3B 63.50, all
    within 3% with it and 10-16% under without it; tests/unit/training/test_memory_estimate.py). The fused
    MLP (`fused_mlp`, mlp_impl quack) keeps fc1's output (gated: gate and up) only, compiled or not (410M: 16.18
    GiB measured)."""
    h, heads, kv = model.hidden_size, model.num_attention_heads, derived.num_kv_heads
    head_dim = h // heads
    qkv = (heads + 2 * kv) * head_dim / h
    if model.pos_emb == "rotary":  # new q and k tensors (rotary's cat)
        rotated = (heads + kv) * head_dim / h
    else:  # q is a view of the fused qkv buffer with one query head per group, else a copy
        rotated = 0.0 if heads == kv else 1.0
    attention = (qkv + rotated + (0.0 if "core_attn" in recompute_modules else 1.0)) / tp
    ffn = derived.intermediate_size / h
    from megatron.neox_args.derive import GATED_ACTIVATIONS

    gated = model.activation in GATED_ACTIVATIONS
    if fused_mlp:  # fc1's output (gate and up); the activation's is recomputed in the data gradient's epilogue
        per_ffn = 2.0 if gated else 1.0
    elif compiled:  # gate and up (gated) or fc1's output; one ffn-wide tensor more without a checkpoint (measured)
        per_ffn = (2.0 if gated else 1.0) + (0.0 if checkpointed else 1.0)
    else:  # the same plus act(gate) and the product, or the activation's output, unless recomputed
        per_ffn = (4.0 if gated else 2.0) - (1.0 if "mlp_act" in recompute_modules else 0.0)
    mlp = per_ffn * ffn / tp
    if model.mlp_chunk_size is not None:
        s_local = model.seq_length / (tp if sequence_parallel else 1)
        mlp *= min(1.0, model.mlp_chunk_size / s_local)
    replicated = (1.0 if model.gpt_j_residual else 2.0) + 2.0
    if sequence_parallel:
        replicated /= tp
    return replicated + attention + mlp


def kept_attention_bytes(model, derived, tp: int, micro: int, a: int) -> float:
    """Bytes one layer's attention kernel keeps for backward under checkpoint_keep_attention: q, k, v and
    its output `[s, b, heads/t or kv/t, d]` in the activation dtype plus fp32 log-sum-exp `[b, heads/t, s]`."""
    head_dim = model.hidden_size // model.num_attention_heads
    tokens = micro * model.seq_length
    heads, kv = model.num_attention_heads / tp, derived.num_kv_heads / tp
    return tokens * ((2 * heads + 2 * kv) * head_dim * a + 4 * heads)


def resolved_mlp_impl(args, device_type: str) -> str:
    """`mlp_impl` as the run will resolve it (megatron/training/device_defaults.py): what was written, else
    on a machine with the CUDA device the run uses, the device's choice; else the torch layer."""
    if args.model.mlp_impl is not None:
        return args.model.mlp_impl
    import torch

    if device_type != "cuda" or not torch.cuda.is_available():
        return "torch"
    from megatron.training.device_defaults import resolve_for_args

    return resolve_for_args(args, device_type).mlp_impl


def estimate_memory(args, device_type: str = "cuda") -> MemoryEstimate:
    """The estimate for a resolved NeoXArgs (vocab size set) on one rank of `device_type` (an unset
    torch_compile counts as resolved for it: compiled on CUDA, megatron/training/device_defaults.py)."""
    model, derived, parallel, training = args.model, args.derived, args.parallel, args.training
    tp, dp = parallel.model_parallel_size, derived.data_parallel_size
    sp = parallel.sequence_parallel
    a = _precision_bytes(derived.precision)
    p = total_params(model, derived) / tp
    zero = parallel.zero_optimization
    stage = zero.get("stage", 0)
    offload = zero.get("offload_optimizer") or {}
    offloaded = stage > 0 and offload.get("device", "none") == "cpu"
    pinned = offloaded and bool(offload.get("pin_memory", False))
    fp32_sums = (derived.precision != "fp32" and args.precision.data_types.get("grad_accum_dtype") == "fp32"
                 and stage == 1 and not offloaded)
    est = MemoryEstimate()
    dev, host = est.device, est.host

    dev["weights"] = a * p / (dp if stage == 3 else 1)
    immediate = bool(args.precision.bf16.get("immediate_grad_update", False))
    if fp32_sums:
        dev["fp32 gradient sums"] = 4 * p
    else:
        dev["gradients"] = a * p / (dp if stage >= 2 else 1)
    state_shard = p / (dp if stage >= 1 else 1)
    optimizer = {"Adam states": 8 * state_shard}
    if derived.precision != "fp32":
        optimizer["fp32 masters"] = 4 * state_shard
    if offloaded:
        host_terms = dict(optimizer)
        host_terms["fp32 gradients"] = 4 * state_shard
        host_terms["bf16 copy buffer"] = a * state_shard
        host_terms["first-backward growth (measured)"] = 4 * state_shard
        for name in ("fp32 masters", "fp32 gradients", "bf16 copy buffer"):
            if pinned and name in host_terms:
                host_terms[name] = pinned_size(host_terms[name])
        host.update({f"offload: {k}": v for k, v in host_terms.items()})
    else:
        dev.update(optimizer)

    micro = derived.train_micro_batch_size_per_gpu
    e = micro * model.seq_length * model.hidden_size * a  # bytes of one [s, b, h] activation
    e_local = e / tp if sp else e
    compiled = training.torch_compile if training.torch_compile is not None else device_type == "cuda"
    per_layer = layer_activation_elements(model, derived, tp, sp, compiled, training.recompute_modules,
                                          checkpointed=training.checkpoint_activations,
                                          fused_mlp=resolved_mlp_impl(args, device_type) == "quack") * e
    layers = model.num_layers
    if training.checkpoint_activations:
        k = training.checkpoint_num_layers
        inputs = math.ceil(layers / k) * e_local
        if training.checkpoint_in_cpu:
            host["checkpointed inputs (pinned)"] = math.ceil(layers / k) * pinned_size(e_local)
        else:
            dev["checkpointed inputs"] = inputs
        dev["recomputed chunk"] = min(k, layers) * per_layer
        if training.checkpoint_keep_attention:
            dev["kept attention tensors"] = layers * kept_attention_bytes(model, derived, tp, micro, a)
    else:
        dev["layer activations"] = layers * per_layer
    chunk = min(model.cross_entropy_chunk_size, micro * model.seq_length) if model.fused_cross_entropy \
        else micro * model.seq_length
    dev["head and loss"] = 3 * e + 2 * 4 * chunk * derived.padded_vocab_size / tp
    dev["gradients in flight"] = 2 * e
    if fp32_sums and not immediate:
        # the peak at the end of backward: every bf16 gradient alive, the checkpointed inputs and the head's
        # activations already freed (6.9B at 32k, ZeRO-1: 132.2 GiB measured, 129.0 estimated without this)
        freed = dev.get("checkpointed inputs", 0.0) + dev.get("layer activations", 0.0) + dev["head and loss"]
        if a * p > freed:
            dev["bf16 gradients before their fold"] = a * p - freed
        if derived.free_grad_sums and derived.gradient_accumulation_steps == 1:
            # the sums exist only from the fold after backward (every activation freed, every bf16
            # gradient alive) to the step: the peak is the larger of the two phases
            sums = dev.pop("fp32 gradient sums")
            others = sum(v for k, v in dev.items() if k not in ("weights", "Adam states", "fp32 masters"))
            after_backward = a * p + sums
            if after_backward > others:
                dev["fp32 gradient sums (after backward only)"] = after_backward - others
    host["baseline allowance"] = HOST_BASELINE_BYTES.get(device_type, HOST_BASELINE_BYTES["cuda"])
    return est


def _host_available_bytes() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(args, est: MemoryEstimate, device_free: float | None, host_available: float | None,
                 ranks_per_host: int = 1) -> None:
    """Raise ConfigError when the estimate exceeds the device's free memory or the host's available
    memory (shared by `ranks_per_host` ranks). None capacities are not checked."""
    first = ("bf16: {immediate_grad_update: true} (frees each bf16 gradient as it is produced), "
             if "bf16 gradients before their fold" in est.device else "")
    hint = (f"Levers: {first}checkpoint_activations (and checkpoint_num_layers 1), mlp_chunk_size, "
            "checkpoint_in_cpu, zero_optimization stage 2 with offload_optimizer {device: cpu} (pin_memory: false "
            "uses less host memory), model_parallel_size with sequence_parallel, a shorter seq_length or "
            "micro-batch; memory_check: false skips this check.")
    if device_free is not None and est.device_bytes > device_free:
        raise ConfigError(
            f"memory_check: this run needs about {est.device_bytes / GIB:.1f} GiB of device memory per rank but "
            f"{device_free / GIB:.1f} GiB are free (seq_length {args.model.seq_length}, micro-batch "
            f"{args.derived.train_micro_batch_size_per_gpu}). Estimate: {est.table()}. {hint}", key="memory_check")
    if host_available is not None and est.host_bytes * ranks_per_host > host_available:
        raise ConfigError(
            f"memory_check: this run needs about {est.host_bytes * ranks_per_host / GIB:.1f} GiB of host memory "
            f"({ranks_per_host} rank(s) x {est.host_bytes / GIB:.1f} GiB) but {host_available / GIB:.1f} GiB are "
            f"available; it would be killed by the kernel once the optimizer states exist. Estimate: "
            f"{est.table()}. {hint}", key="memory_check")


def check_run_memory(args, device_type: str) -> MemoryEstimate:
    """The estimate of this run, checked against this machine (called by train.py on every rank)."""
    est = estimate_memory(args, device_type)
    if not args.training.memory_check:
        return est
    device_free = None
    if device_type == "cuda":
        import torch

        device_free = float(torch.cuda.mem_get_info()[0])
    # ranks sharing this host: DeepSpeed's launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE
    ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")
    check_memory(args, est, device_free, _host_available_bytes(), ranks)
    return est


def main(argv=None) -> int:
    from megatron.neox_args import NeoXArgs

    parser = argparse.ArgumentParser(description="Estimate device and host memory of a config (one rank).")
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (YAML value)")
    parser.add_argument("--vocab", type=int, default=50277, help="tokenizer vocabulary (default: GPT-NeoX's 50277)")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--device-gib", type=float, default=None, help="device memory to check against")
    parser.add_argument("--host-gib", type=float, default=None, help="host memory to check against")
    opts = parser.parse_args(argv)
    import yaml

    from megatron.neox_args.loader import Setting, merge_settings, read_yaml_file

    settings = merge_settings([(read_yaml_file(path), path) for path in opts.configs])
    for item in opts.set:  # --set replaces a key of the files (top-level keys only)
        key, _, value = item.partition("=")
        settings[key.replace("-", "_")] = Setting(yaml.safe_load(value), "--set", key)
    args = NeoXArgs._build(settings, opts.world_size, check_files=False)
    args.set_vocab_size(opts.vocab)
    est = estimate_memory(args)
    print(est.table())
    try:
        check_memory(args, est, None if opts.device_gib is None else opts.device_gib * GIB,
                     None if opts.host_gib is None else opts.host_gib * GIB)
    except ConfigError as err:
        print(f"refused: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
