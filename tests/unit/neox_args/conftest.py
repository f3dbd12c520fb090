"""Shared helpers for the config tests: a minimal valid flat config and a YAML file writer."""

import textwrap

import pytest

MINIMAL = {
    "data_path": "data/bundled/pystdlib_text_document",
    "train_micro_batch_size_per_gpu": 2,
    "tokenizer_type": "ByteLevelTokenizer",
    "lr": 6.0e-4,
}
"""The smallest dict that validates on its own (bundled data is not checked on disk)."""


@pytest.fixture
def minimal():
    """A fresh copy of MINIMAL, to extend with overrides."""
    return dict(MINIMAL)


@pytest.fixture
def write_yaml(tmp_path):
    """write_yaml("a.yml", "key: value") -> path of a dedented YAML file in tmp_path."""

    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write
