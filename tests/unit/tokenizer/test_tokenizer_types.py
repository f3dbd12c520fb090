"""Tokenizers: round trips, eod ids, file errors, and a tokenizer trained by tools/datasets/train_tokenizer.py."""

import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron.tokenizer import (
    ByteLevelTokenizer,
    GPT2BPETokenizer,
    HFTokenizer,
    TokenizerFileError,
    build_tokenizer,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: naïve café, 日本語, emoji 🎉 and math ∑x².",
    "",
]


def spec(kind, vocab=None, merge=None):
    return SimpleNamespace(tokenizer_type=kind, vocab_file=vocab, merge_file=merge)


def make_corpus(path, n_docs=300, seed=0):
    """A small deterministic English-ish jsonl corpus."""
    rng = random.Random(seed)
    words = ("the model reads tokens from documents and learns to predict the next one; "
             "data parallel ranks share gradients while tensor parallel ranks split layers. "
             "naïve café résumé 日本 über").split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"text": text.capitalize() + "."}) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train a 400-id BPE with the command-line tool (as a user would)."""
    work = tmp_path_factory.mktemp("tok")
    corpus = work / "corpus.jsonl"
    make_corpus(corpus)
    out = work / "tok"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "datasets", "train_tokenizer.py"), "--input", str(corpus),
         "--vocab-size", "400", "--output-dir", str(out), "--write-vocab-merges"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_byte_level_round_trip_and_eod():
    tok = build_tokenizer(spec("ByteLevelTokenizer"))
    assert isinstance(tok, ByteLevelTokenizer)
    assert tok.vocab_size == 257 and tok.eod == 256 and tok.name == "ByteLevelTokenizer"
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.detokenize(ids) == text
    assert tok.detokenize(tok.tokenize("ab") + [tok.eod] + tok.tokenize("c")) == "abc"
    assert list(tok.tokenize_to_array("é")) == [0xC3, 0xA9]


def test_trained_tokenizer_loads_through_hf(trained):
    tok = build_tokenizer(spec("HFTokenizer", str(trained / "tokenizer.json")))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 400
    assert tok.eod == 0  # <|endoftext|> is the first (special) token
    assert tok.tokenize("<|endoftext|>") == [tok.eod]
    for text in TEXTS:
        assert tok.detokenize(tok.tokenize(text)) == text
    # merges were learned: a common word is fewer tokens than bytes
    assert len(tok.tokenize(" the model reads")) < len(" the model reads")


def test_gpt2_bpe_from_vocab_merges_matches_hf(trained):
    hf = build_tokenizer(spec("HFTokenizer", str(trained / "tokenizer.json")))
    gpt2 = build_tokenizer(spec("GPT2BPETokenizer", str(trained / "vocab.json"), str(trained / "merges.txt")))
    assert isinstance(gpt2, GPT2BPETokenizer)
    assert gpt2.eod == hf.eod and gpt2.vocab_size == hf.vocab_size
    for text in TEXTS + ["the model reads tokens from documents, naïve café 日本 über alles"]:
        assert gpt2.tokenize(text) == hf.tokenize(text)
        assert gpt2.detokenize(gpt2.tokenize(text)) == text


def test_missing_files_name_the_key(tmp_path):
    with pytest.raises(TokenizerFileError, match="vocab_file"):
        build_tokenizer(spec("HFTokenizer", None))
    with pytest.raises(TokenizerFileError, match=r"vocab_file.*nope\.json"):
        build_tokenizer(spec("HFTokenizer", str(tmp_path / "nope.json")))
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}))
    with pytest.raises(TokenizerFileError, match=r"merge_file.*merges\.txt"):
        build_tokenizer(spec("GPT2BPETokenizer", str(vocab), str(tmp_path / "merges.txt")))


def test_garbled_files_name_the_key(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    with pytest.raises(TokenizerFileError, match="vocab_file"):
        build_tokenizer(spec("HFTokenizer", str(bad)))
    vocab = tmp_path / "vocab.json"
    vocab.write_text("[1, 2")
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerFileError, match="vocab_file"):
        build_tokenizer(spec("GPT2BPETokenizer", str(vocab), str(merges)))
    vocab.write_text(json.dumps({"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}))
    merges.write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerFileError, match=r"merge_file.*line 2"):
        build_tokenizer(spec("GPT2BPETokenizer", str(vocab), str(merges)))
    merges.write_text("a b\n")
    tok = build_tokenizer(spec("GPT2BPETokenizer", str(vocab), str(merges)))
    assert tok.tokenize("ab") == [3] and tok.eod == 0


def test_unknown_type():
    with pytest.raises(ValueError, match="ByteLevelTokenizer"):
        build_tokenizer(spec("SentencePiece"))


# --- GPT-NeoX's other tokenizer types (files made here; nothing downloaded) ---------------------------------

def _spm_model(tmp_path, corpus_texts, name, symbols=()):
    import sentencepiece

    text = tmp_path / f"{name}.txt"
    text.write_text("\n".join(corpus_texts), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / name), vocab_size=120,
                                             model_type="bpe", user_defined_symbols=list(symbols),
                                             minloglevel=2)
    return str(tmp_path / f"{name}.model")


def test_spm_tokenizer_ids_and_upstreams_eod_rule(tmp_path):
    import sentencepiece

    corpus = ["the model reads tokens from documents and learns to predict the next one"] * 50 + TEXTS[:3]
    path = _spm_model(tmp_path, corpus, "with_eod", symbols=["<|endoftext|>"])
    tok = build_tokenizer(spec("SPMTokenizer", path))
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    assert tok.vocab_size == sp.get_piece_size() == 120
    assert tok.eod == sp.piece_to_id("<|endoftext|>") != sp.unk_id()
    assert tok.tokenize("the model reads") == sp.encode("the model reads")
    assert tok.detokenize(tok.tokenize("the model reads")) == "the model reads"
    # no <|endoftext|> piece: upstream's piece_to_id gives the unknown id, and so does ours (documented)
    plain = build_tokenizer(spec("SPMTokenizer", _spm_model(tmp_path, corpus, "plain")))
    assert plain.eod == sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "plain.model")).unk_id()


def test_hf_gpt2_tokenizer_adds_upstreams_pad_and_matches_gpt2_bpe(trained):
    tok = build_tokenizer(spec("HFGPT2Tokenizer", str(trained)))
    gpt2 = build_tokenizer(spec("GPT2BPETokenizer", str(trained / "vocab.json"), str(trained / "merges.txt")))
    assert tok.vocab_size == gpt2.vocab_size + 1  # <|padding|> added, as upstream
    assert tok.eod == gpt2.eod
    for text in TEXTS + ["the model reads tokens, naïve café"]:
        assert tok.tokenize(text) == gpt2.tokenize(text)
    with pytest.raises(TokenizerFileError, match="could not be loaded"):
        build_tokenizer(spec("HFGPT2Tokenizer", str(trained / "nope")))


def test_char_level_tokenizer_is_upstreams_utf8_bytes_with_vocab_512():
    tok = build_tokenizer(spec("CharLevelTokenizer"))
    assert (tok.vocab_size, tok.eod) == (512, 0)
    assert tok.tokenize("aé") == [97, 0xC3, 0xA9]
    assert tok.detokenize(tok.tokenize("naïve café") + [0]) == "naïve café"


def test_tiktoken_tokenizer_from_a_local_bpe_file(tmp_path):
    import base64

    ranks = [bytes([i]) for i in range(256)] + [b"th", b"he", b"the"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tok = build_tokenizer(spec("TiktokenTokenizer", str(path)))
    assert tok.vocab_size == 260 and tok.eod == 259
    ids = tok.tokenize("the tea")
    assert ids[0] == 258 and tok.detokenize(ids + [tok.eod]) == "the tea"
    with pytest.raises(TokenizerFileError, match="could not be loaded"):
        build_tokenizer(spec("TiktokenTokenizer", "no_such_encoding_name"))
