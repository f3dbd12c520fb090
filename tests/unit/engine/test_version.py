"""megatron/engine/version.py: the one DeepSpeed version check, and the requirements state the same range."""

import os

import pytest

from megatron.engine.version import (SUPPORTED_BELOW, SUPPORTED_MIN, DeepSpeedVersionError, check_deepspeed_version,
                                     parse_version)


@pytest.mark.parametrize("text, parsed", [("0.19.8", (0, 19, 8)), ("0.19", (0, 19, 0)),
                                          ("0.19.8+cu124", (0, 19, 8)), ("0.20.0rc1", (0, 20, 0))])
def test_parse(text, parsed):
    assert parse_version(text) == parsed


def test_supported_and_refused_versions():
    assert check_deepspeed_version("0.19.0") == "0.19.0"
    assert check_deepspeed_version("0.19.8+cu124") == "0.19.8+cu124"
    for bad in ("0.16.9", "0.18.5", "0.20.0", "1.0.0"):
        with pytest.raises(DeepSpeedVersionError) as err:
            check_deepspeed_version(bad)
        message = str(err.value)
        assert f"DeepSpeed {bad} is installed" in message and "pip install 'deepspeed>=0.19,<0.20'" in message
        assert "BF16_Optimizer" in message
    with pytest.raises(DeepSpeedVersionError, match="cannot read"):
        parse_version("unknown")


def test_installed_deepspeed_passes():
    check_deepspeed_version()


def test_requirements_state_the_checked_range():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with open(os.path.join(root, "requirements", "requirements.txt")) as handle:
        lines = [line.split("#")[0].strip() for line in handle if line.startswith("deepspeed")]
    low, high = ".".join(map(str, SUPPORTED_MIN[:2])), ".".join(map(str, SUPPORTED_BELOW[:2]))
    assert lines == [f"deepspeed>={low},<{high}"]
