"""tools/datasets/preprocess_data.py: jsonl/text -> .bin/.idx equal to tokenizing directly."""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess import preprocess_files
from megatron.tokenizer import build_tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DOCS = [f"Document {i}: " + "naïve café 日本 " * (i % 7) + "the end." for i in range(57)]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "datasets", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    work = tmp_path_factory.mktemp("pre")
    path = work / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(DOCS):
            f.write(json.dumps({"text": text, "title": f"title {i}"}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are skipped
    return work, path


@pytest.fixture(scope="module")
def hf_tokenizer_file(corpus):
    work, path = corpus
    return load_tool("train_tokenizer").train_tokenizer([str(path)], 300, str(work / "tok"), show_progress=False)


def test_cli_two_workers_byte_level(corpus, tmp_path):
    _, path = corpus
    out = str(tmp_path / "out" / "corpus")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "datasets", "preprocess_data.py"), "--input", str(path),
         "--output-prefix", out, "--tokenizer-type", "ByteLevelTokenizer", "--append-eod", "--workers", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "docs/s" in result.stderr and "MB/s" in result.stderr  # the progress bar
    ds = MMapIndexedDataset(out + "_text_document")
    assert ds.dtype == np.uint16
    assert len(ds) == len(DOCS) and ds.doc_idx.tolist() == list(range(len(DOCS) + 1))
    for i, text in enumerate(DOCS):
        assert ds[i].tolist() == list(text.encode("utf-8")) + [256]


def test_two_workers_hf_tokenizer_two_keys(corpus, hf_tokenizer_file, tmp_path):
    _, path = corpus
    spec = SimpleNamespace(tokenizer_type="HFTokenizer", vocab_file=hf_tokenizer_file, merge_file=None)
    tok = build_tokenizer(spec)
    written = preprocess_files([str(path)], str(tmp_path / "c"), spec, jsonl_keys=["text", "title"],
                               append_eod=True, workers=2, show_progress=False)
    assert written == {"text": str(tmp_path / "c_text_document"), "title": str(tmp_path / "c_title_document")}
    text_ds, title_ds = MMapIndexedDataset(written["text"]), MMapIndexedDataset(written["title"])
    for i, text in enumerate(DOCS):
        assert text_ds[i].tolist() == tok.tokenize(text) + [tok.eod]
        assert title_ds[i].tolist() == tok.tokenize(f"title {i}") + [tok.eod]
    # the same with one worker gives the same bytes (ordered output)
    one = preprocess_files([str(path)], str(tmp_path / "one"), spec, workers=1, append_eod=True, show_progress=False)
    for suffix in (".bin", ".idx"):
        with open(written["text"] + suffix, "rb") as a, open(one["text"] + suffix, "rb") as b:
            assert a.read() == b.read()


def test_text_format_one_document_per_file(tmp_path):
    files = []
    for i, text in enumerate(["first file\n\nwith two paragraphs", "second"]):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    spec = SimpleNamespace(tokenizer_type="ByteLevelTokenizer", vocab_file=None, merge_file=None)
    written = preprocess_files([str(f) for f in files], str(tmp_path / "t"), spec, input_format="text",
                               show_progress=False)
    ds = MMapIndexedDataset(written["text"])
    assert len(ds) == 2
    assert bytes(ds[0].astype(np.uint8)) == b"first file\n\nwith two paragraphs"  # no eod without --append-eod


def test_missing_key_is_a_clear_error(corpus, tmp_path):
    _, path = corpus
    spec = SimpleNamespace(tokenizer_type="ByteLevelTokenizer", vocab_file=None, merge_file=None)
    with pytest.raises(KeyError, match="body"):
        preprocess_files([str(path)], str(tmp_path / "k"), spec, jsonl_keys=["body"], show_progress=False)
