"""The one DeepSpeed version check.

`megatron/engine` reaches into DeepSpeed's internals in three ways that were written and tested against
DeepSpeed 0.19: the BF16_Optimizer methods `bf16_optimizer_patches` replaces (their names, attributes and
call order), the construction step of FP16_UnfusedOptimizer that `fp16_optimizer_init` undoes, and the
optimizer-wrapper choice that `optimizer_kind` mirrors (to refuse a resume across wrappers before DeepSpeed
reads the files). Older releases differ in all three (0.16-0.18 have no LossScaleConfig, another
BF16_Optimizer step; 0.20 is unreleased), so the check enforces the range those were verified on:

    SUPPORTED_MIN <= deepspeed.__version__ < SUPPORTED_BELOW      (0.19.0 <= version < 0.20)

requirements/requirements.txt states the same range. `check_deepspeed_version()` runs in the launcher
(before any worker starts) and again in `build_engine` (workers started another way).
"""

from __future__ import annotations

import re

SUPPORTED_MIN = (0, 19, 0)
SUPPORTED_BELOW = (0, 20, 0)


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is outside the supported range; the message says which to install."""


def parse_version(text: str) -> tuple[int, int, int]:
    """'0.19.8' -> (0, 19, 8); a local or pre-release suffix ('0.19.8+cu124', '0.20.0rc1') is ignored."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise DeepSpeedVersionError(f"cannot read the DeepSpeed version {text!r}; expected e.g. '0.19.8'.")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def check_deepspeed_version(version: str | None = None) -> str:
    """Raise `DeepSpeedVersionError` unless `version` (default: the installed DeepSpeed's) is supported;
    returns the version string."""
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed_version

        try:  # the installed distribution's metadata: no need to import DeepSpeed (and its accelerator probe)
            version = installed_version("deepspeed")
        except PackageNotFoundError:
            raise DeepSpeedVersionError("DeepSpeed is not installed; pip install -r requirements/requirements.txt "
                                        "(it needs deepspeed>=0.19,<0.20).") from None
    parsed = parse_version(version)
    if not SUPPORTED_MIN <= parsed < SUPPORTED_BELOW:
        wanted = f">={_dotted(SUPPORTED_MIN[:2])},<{_dotted(SUPPORTED_BELOW[:2])}"
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} is installed, but this trainer supports DeepSpeed {wanted}: megatron/engine "
            f"replaces methods of DeepSpeed's BF16_Optimizer, undoes the construction step of its "
            f"FP16_UnfusedOptimizer and mirrors its choice of optimizer wrapper, all written and tested against "
            f"0.19. Install a supported release: pip install 'deepspeed{wanted}'.")
    return version
