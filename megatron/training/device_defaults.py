"""Fast by default: what a config leaves unset (`torch_compile`, `attention_impl`, `mlp_impl`, `mlp_autotune`,
`sdpa_backend`) is
chosen for the device.

A size file runs anywhere, so it cannot name the settings that are fastest on one device. When the user
leaves a key unset (null, the default), the worker resolves it here, once, from the device it runs on,
and prints the choice with the key that overrides it. A value the user wrote is always kept.

| key | CUDA | CPU |
|---|---|---|
| `torch_compile` null | on: each transformer layer compiled (410M on one H200: 139k -> 178k tokens/s together with cuDNN attention, docs/PERFORMANCE.md) | off: compiling costs more than it gains for the tiny CPU models |
| `attention_impl` null | `fa4` (FlashAttention-4) on Hopper for bf16/fp16 causal attention without dropout at head size 64 or 128 and seq_length >= 8192, when `flash_attn.cute` imports (measured faster than cuDNN there: 8k-128k, issue 16); otherwise `sdpa` | `sdpa` |
| `mlp_impl` null | `quack` (the activation in the GEMM epilogues, megatron/model/fused_mlp.py) on Hopper for a bf16 GELU MLP or SwiGLU MLP without biases, without sequence parallelism, when quack imports (measured on an H200: as fast as cuBLAS + the compiled activation, faster autotuned, with one `[s, b, ffn]` tensor per layer less, two for SwiGLU, docs/PERFORMANCE.md); otherwise `torch` | `torch` |
| `mlp_autotune` null | on where the MLP runs on quack (quack's autotuned tile configs measured +1.7% to +3.1% tokens/s over its default config on an H200); off otherwise | off |
| `sdpa_backend` null | `cudnn` on Hopper (compute capability 9.x) for bf16/fp16 causal attention without dropout (the fastest SDPA kernel measured there at head dims 64 and 128); elsewhere torch's own choice | torch's own choice |

The resolved values never enter the config sections (those hold what the user wrote); the model is built
from a copy of `ModelArgs` with the resolved backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DeviceChoices:
    """The resolved settings and, for each one that was chosen here, why (printed at start)."""

    torch_compile: bool
    sdpa_backend: Optional[str]
    reasons: list[str] = field(default_factory=list)
    attention_impl: str = "sdpa"
    mlp_impl: str = "torch"
    mlp_autotune: bool = False


FA4_MEASURED_FASTER = {64: 8192, 128: 8192}
"""Head size -> shortest sequence at which FlashAttention-4 was measured faster than cuDNN SDPA on an H200
(causal fwd+bwd bf16, issue 16: hd 64 8k 2.17 vs 2.50 ms, 32k 14.6 vs 17.9; hd 128 8k 6.49 vs 7.11, 64k 99.9
vs 109.8, 128k 390 vs 453; at 2k, hd 64, cuDNN was faster: 0.98 vs 1.12). Other head sizes: not measured."""


def _resolve_attention_impl(model, cuda: bool, precision: str, capability, fa4_available) -> tuple[str, str]:
    """(impl, reason) for an unset attention_impl; reason is "" when nothing was chosen beyond sdpa."""
    head_dim = model.hidden_size // model.num_attention_heads
    threshold = FA4_MEASURED_FASTER.get(head_dim)
    if (cuda and capability[0] == 9 and precision in ("bf16", "fp16") and model.attention_dropout == 0.0
            and threshold is not None and model.seq_length >= threshold and fa4_available()):
        return "fa4", (f"attention_impl: fa4 (unset; FlashAttention-4 measured faster than cuDNN on Hopper at head "
                       f"size {head_dim} from {threshold} tokens; set attention_impl: sdpa to choose torch's)")
    return "sdpa", ""


def _resolve_mlp_impl(model, cuda: bool, precision: str, capability, sequence_parallel: bool,
                      quack_available, mlp_width: Optional[int], zero_stage: int) -> tuple[str, str]:
    """(impl, reason) for an unset mlp_impl; reason is "" when nothing was chosen beyond torch. Not under ZeRO
    stage 3, which gathers a partitioned weight only for its own module's forward (the fused MLP reads fc1's
    and fc2's weights in the MLP's)."""
    from megatron.neox_args.validate_mlp import fused_mlp_refusal

    if (cuda and capability[0] == 9
            and fused_mlp_refusal(model.activation, model.use_bias_in_mlp, precision, sequence_parallel, zero_stage,
                                  model.hidden_size, mlp_width) is None and quack_available()):
        which = "GELU" if model.activation == "gelu" else "SwiGLU"
        return "quack", (f"mlp_impl: quack (unset; the {which} in quack's GEMM epilogues, measured at least as fast as "
                         f"cuBLAS and a compiled {which} on Hopper with less memory; set mlp_impl: torch to choose "
                         f"the unfused layer)")
    return "torch", ""


def _resolve_mlp_autotune(autotune: Optional[bool], mlp_impl: str) -> tuple[bool, str]:
    """(autotune, reason) for `mlp_autotune` once `mlp_impl` is resolved: null is on where the MLP runs on quack;
    a `true` the resolved torch layer cannot use is dropped with a notice (set beside an explicit
    `mlp_impl: torch` it is a ConfigError at launch, megatron/neox_args/validate_mlp.py)."""
    if mlp_impl != "quack":
        if autotune:
            return False, ("mlp_autotune: true does nothing here: mlp_impl resolved to torch (quack is not used on "
                           "this device or for this model)")
        return False, ""
    if autotune is None:
        return True, ("mlp_autotune: true (unset; quack's autotuned tile configs measured faster in training than its "
                      "default config; the first step also times them for each GEMM shape, kept in $QUACK_CACHE_DIR "
                      "or ~/.quack/cache for later runs; set mlp_autotune: false to take the default config)")
    return autotune, ""


def resolve_device_defaults(model, training, device_type: str, precision: str,
                            capability: Optional[tuple[int, int]] = None, fa4_available=None,
                            sequence_parallel: bool = False, quack_available=None,
                            mlp_width: Optional[int] = None, zero_stage: int = 0) -> DeviceChoices:
    """Resolve the unset `training.torch_compile`, `model.attention_impl`, `model.mlp_impl` and
    `model.sdpa_backend` for `device_type` ("cuda"/"cpu") and the run's `precision` ("fp32", "bf16", "fp16":
    cuDNN attention takes half precision only).

    `capability` is the CUDA compute capability (major, minor); None asks torch (CUDA only).
    `fa4_available()` / `quack_available()` say whether flash_attn.cute / quack import (default: try it).
    `sequence_parallel`: in effect (more than one tensor-parallel rank); `mlp_width`: the MLP width per
    tensor-parallel rank (quack's GEMMs need it and hidden_size multiples of 8); `zero_stage`: the ZeRO stage.
    """
    reasons: list[str] = []
    cuda = device_type == "cuda"
    compile_layers = training.torch_compile
    if compile_layers is None:
        compile_layers = cuda
        reasons.append(f"torch_compile: {'true' if cuda else 'false'} (unset; "
                       + ("compiled layers are faster on CUDA" if cuda else "compiling does not pay on CPU")
                       + "; set torch_compile to choose)")
    if cuda and capability is None:
        import torch

        capability = torch.cuda.get_device_capability()
    impl = model.attention_impl
    if impl is None:
        if fa4_available is None:
            from megatron.model.attention_kernels import import_fa4

            def fa4_available():
                return import_fa4() is not None
        impl, reason = _resolve_attention_impl(model, cuda, precision, capability, fa4_available)
        if reason:
            reasons.append(reason)
    mlp_impl = model.mlp_impl
    if mlp_impl is None:
        if quack_available is None:
            from megatron.model.mlp_support import import_quack

            def quack_available():
                return import_quack() is not None
        mlp_impl, reason = _resolve_mlp_impl(model, cuda, precision, capability, sequence_parallel, quack_available,
                                             mlp_width, zero_stage)
        if reason:
            reasons.append(reason)
    autotune, reason = _resolve_mlp_autotune(model.mlp_autotune, mlp_impl)
    if reason:
        reasons.append(reason)
    backend = model.sdpa_backend
    if backend is None and cuda and impl == "sdpa" and precision in ("bf16", "fp16"):
        if capability[0] == 9 and model.attention_dropout == 0.0:
            backend = "cudnn"
            reasons.append("sdpa_backend: cudnn (unset; the fastest causal SDPA kernel measured on Hopper; "
                           "set sdpa_backend: flash|efficient|math to choose another)")
    return DeviceChoices(torch_compile=bool(compile_layers), sdpa_backend=backend, reasons=reasons,
                         attention_impl=impl, mlp_impl=mlp_impl, mlp_autotune=autotune)


def resolve_for_args(args, device_type: str) -> DeviceChoices:
    """`resolve_device_defaults` for a resolved NeoXArgs, with the parallel facts the MLP choice needs taken
    from it (sequence parallelism in effect, the MLP width per tensor-parallel rank, the ZeRO stage): what
    training, the memory estimate and the benchmarks' notes all resolve."""
    tp = args.parallel.model_parallel_size
    return resolve_device_defaults(args.model, args.training, device_type, args.derived.precision,
                                   sequence_parallel=args.parallel.sequence_parallel and tp > 1,
                                   mlp_width=args.derived.intermediate_size // tp,
                                   zero_stage=args.parallel.zero_optimization.get("stage", 0))


def model_args_with(model, choices: DeviceChoices):
    """A copy of ModelArgs `model` carrying the resolved attention kernel and backend, MLP kernels and their
    tuning (the original is not changed)."""
    return dataclasses.replace(model, sdpa_backend=choices.sdpa_backend, attention_impl=choices.attention_impl,
                               mlp_impl=choices.mlp_impl, mlp_autotune=choices.mlp_autotune)
