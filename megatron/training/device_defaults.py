"""Fast by default: what a config leaves unset (`torch_compile`, `sdpa_backend`) is chosen for the device.

A size file runs anywhere, so it cannot name the settings that are fastest on one device. When the user
leaves a key unset (null, the default), the worker resolves it here, once, from the device it runs on,
and prints the choice with the key that overrides it. A value the user wrote is always kept.

| key | CUDA | CPU |
|---|---|---|
| `torch_compile` null | on: each transformer layer compiled (410M on one H200: 139k -> 178k tokens/s together with cuDNN attention, docs/PERFORMANCE.md) | off: compiling costs more than it gains for the tiny CPU models |
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


def resolve_device_defaults(model, training, device_type: str, precision: str,
                            capability: Optional[tuple[int, int]] = None) -> DeviceChoices:
    """Resolve the unset `training.torch_compile` and `model.sdpa_backend` for `device_type` ("cuda"/"cpu")
    and the run's `precision` ("fp32", "bf16", "fp16": cuDNN attention takes half precision only).

    `capability` is the CUDA compute capability (major, minor); None asks torch (CUDA only).
    """
    reasons: list[str] = []
    cuda = device_type == "cuda"
    compile_layers = training.torch_compile
    if compile_layers is None:
        compile_layers = cuda
        reasons.append(f"torch_compile: {'true' if cuda else 'false'} (unset; "
                       + ("compiled layers are faster on CUDA" if cuda else "compiling does not pay on CPU")
                       + "; set torch_compile to choose)")
    backend = model.sdpa_backend
    if backend is None and cuda and model.attention_impl == "sdpa" and precision in ("bf16", "fp16"):
        if capability is None:
            import torch

            capability = torch.cuda.get_device_capability()
        if capability[0] == 9 and model.attention_dropout == 0.0:
            backend = "cudnn"
            reasons.append("sdpa_backend: cudnn (unset; the fastest causal SDPA kernel measured on Hopper; "
                           "set sdpa_backend: flash|efficient|math to choose another)")
    return DeviceChoices(torch_compile=bool(compile_layers), sdpa_backend=backend, reasons=reasons)


def model_args_with(model, choices: DeviceChoices):
    """A copy of ModelArgs `model` carrying the resolved attention backend (the original is not changed)."""
    return dataclasses.replace(model, sdpa_backend=choices.sdpa_backend)
