"""docs/CONFIG.md is generated from the field docstrings and must not be stale."""

import dataclasses
from pathlib import Path

from megatron.neox_args import SECTIONS
from megatron.neox_args.docs import DEFAULT_OUTPUT, SECTIONS_FILE, field_docstrings, generate, main


def test_config_md_is_up_to_date():
    assert DEFAULT_OUTPUT.is_file(), "run `python -m megatron.neox_args.docs`"
    assert DEFAULT_OUTPUT.read_text() == generate(), \
        "docs/CONFIG.md is stale: run `python -m megatron.neox_args.docs`"


def test_every_field_has_a_docstring_and_a_row():
    docs = field_docstrings(SECTIONS_FILE.read_text())
    text = generate()
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            annotation, doc = docs[cls.__name__][f.name]
            assert doc.strip(), f"{cls.__name__}.{f.name} has no docstring"
            assert f"| `{f.name}` |" in text


def test_field_docstrings_parser():
    source = 'class A:\n    x: int = 1\n    """The x."""\n\n    y: "Optional[str]" = None\n    z: int = 2\n'
    assert field_docstrings(source) == {"A": {"x": ("int", "The x."), "y": ("'Optional[str]'", ""),
                                              "z": ("int", "")}}


def test_table_row_contents():
    text = generate()
    assert "| `norm` | `Literal['layernorm', 'rmsnorm']` | `'layernorm'` | Normalization layer. |" in text
    assert "| `zero_optimization` | `dict` | `{'stage': 0}` |" in text
    assert "| `betas` | `tuple` | `[0.9, 0.999]` |" in text
    assert "| `rope_fusion` |" in text and "| `sparsity_config` |" in text  # the GPT-NeoX key tables
    assert "## Derived (`DerivedArgs`, computed, not settable)" in text


def test_check_flag_detects_stale_file(tmp_path: Path, capsys):
    target = tmp_path / "CONFIG.md"
    assert main(["--check", "--output", str(target)]) == 1          # missing
    assert main(["--output", str(target)]) == 0                     # write
    assert main(["--check", "--output", str(target)]) == 0          # fresh
    target.write_text(target.read_text() + "edit\n")
    assert main(["--check", "--output", str(target)]) == 1          # stale
    assert "stale" in capsys.readouterr().err
