"""Preprocessing never leaves half a dataset, refuses empty or missing input with a message, and takes
GPT-NeoX's flags, comma-separated inputs and .jsonl.zst; empty documents are skipped (issues 11 and 13)."""

import json
import os
import sys

import numpy as np
import pytest
import zstandard

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "datasets"))

from megatron.data.indexed_dataset import MMapIndexedDataset  # noqa: E402

import preprocess_data  # noqa: E402


def _run(tmp_path, *inputs, extra=()):
    prefix = str(tmp_path / "out")
    preprocess_data.main(["--input", *inputs, "--tokenizer-type", "ByteLevelTokenizer", "--output-prefix", prefix,
                          "--append-eod", *extra])
    return prefix + "_text_document"


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_malformed_line_leaves_no_files_and_keeps_an_older_pair(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", ["aaa", "bbb"])
    prefix = _run(tmp_path, good)
    before = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ccc" * 1000}) + "\n{not json\n")
    with pytest.raises(BaseException):
        _run(tmp_path, str(bad))
    assert {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")} == before  # old pair intact
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "out_text_document.bin",
                                            "out_text_document.idx"]  # no temporary files left


def test_empty_and_missing_input_are_refused_with_a_message(tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(SystemExit, match="no non-empty document; nothing was written"):
        _run(tmp_path, empty)
    with pytest.raises(SystemExit, match="nope.jsonl.*do not exist"):
        _run(tmp_path, str(tmp_path / "nope.jsonl"))
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]


def test_upstream_flags_comma_inputs_zst_and_empty_docs_skipped(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["ab", "", "c"])
    raw = "".join(json.dumps({"text": t}) + "\n" for t in ["de", "f"]).encode()
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    prefix = _run(tmp_path, f"{a},{tmp_path / 'b.jsonl.zst'}",
                  extra=["--num-docs", "5", "--ftfy", "--dataset-impl", "mmap", "--log-interval", "100"])
    ds = MMapIndexedDataset(prefix)
    eod = 256
    docs = [list(np.asarray(ds[i])) for i in range(len(ds))]
    assert docs == [[97, 98, eod], [99, eod], [100, 101, eod], [102, eod]]  # the empty document skipped


def test_convert_to_an_existing_file_is_refused(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools", "ckpts"))
    import convert_neox_to_hf

    target = tmp_path / "model.bin"
    target.write_text("x")
    with pytest.raises(SystemExit, match="is an existing file"):
        convert_neox_to_hf.main(["--load", str(tmp_path), "--output", str(target)])
    assert "wrote" not in capsys.readouterr().out
