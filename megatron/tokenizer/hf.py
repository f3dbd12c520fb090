"""Tokenizers backed by the Hugging Face `tokenizers` library.

- `HFTokenizer`: any `tokenizer.json` (the file `tokenizers.Tokenizer.save` writes).
- `GPT2BPETokenizer`: GPT-2's `vocab.json` + `merges.txt`, run as a byte-level BPE model with GPT-2's
  pre-tokenization (the ByteLevel regex, no prefix space) and `<|endoftext|>` as end-of-document.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from megatron.tokenizer.base import TokenizerFileError, require_file

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
"""HFTokenizer's end-of-document rule: the first of these tokens that the vocabulary holds."""


class _HFBacked:
    """Shared tokenize/detokenize over a `tokenizers.Tokenizer` (`self._tok`) and an eod id."""

    name = ""
    _tok: Tokenizer
    _eod: int

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        """Decode ids; special tokens (eod among them) are dropped, as `tokenizers` does by default."""
        return self._tok.decode([int(i) for i in ids])


class HFTokenizer(_HFBacked):
    """A `tokenizer.json` loaded with `tokenizers.Tokenizer.from_file`.

    eod is the id of the first token of `EOD_CANDIDATES` present in the vocabulary
    (`<|endoftext|>` for GPT-2/GPT-NeoX/Pythia-style files, `</s>` for Llama-2-style ones).
    """

    name = "HFTokenizer"

    def __init__(self, vocab_file: str | None):
        path = require_file(vocab_file, "vocab_file", self.name, "a Hugging Face tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:  # the Rust library raises a bare Exception on bad JSON
            raise TokenizerFileError(
                f"`vocab_file` {path!r} could not be read as a Hugging Face tokenizer.json: {err}"
            ) from err
        vocab = self._tok.get_vocab(with_added_tokens=True)
        for token in EOD_CANDIDATES:
            if token in vocab:
                self._eod = vocab[token]
                break
        else:
            raise TokenizerFileError(
                f"`vocab_file` {path!r} has no end-of-document token: none of {list(EOD_CANDIDATES)} is in its "
                "vocabulary. Add `<|endoftext|>` as a special token to the tokenizer."
            )


class GPT2BPETokenizer(_HFBacked):
    """GPT-2 BPE from `vocab.json` (token -> id) and `merges.txt` (one merge `a b` per line).

    Text is split by GPT-2's regex on the byte-level alphabet (no prefix space), merged by the BPE ranks
    of merges.txt, and decoded back to bytes. `<|endoftext|>` must be in vocab.json; it is the eod id and,
    as in Hugging Face's GPT-2 tokenizer, a literal `<|endoftext|>` in the text maps to that one id.
    """

    name = "GPT2BPETokenizer"
    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str | None, merge_file: str | None):
        vocab_path = require_file(vocab_file, "vocab_file", self.name, "GPT-2 vocab.json")
        merge_path = require_file(merge_file, "merge_file", self.name, "GPT-2 merges.txt")
        vocab = _read_vocab_json(vocab_path)
        merges = _read_merges(merge_path)
        if self.EOD_TOKEN not in vocab:
            raise TokenizerFileError(f"`vocab_file` {vocab_path!r} has no {self.EOD_TOKEN!r} entry (GPT-2's eod).")
        try:
            model = models.BPE(vocab=vocab, merges=merges)
        except Exception as err:
            raise TokenizerFileError(
                f"`vocab_file` {vocab_path!r} and `merge_file` {merge_path!r} do not form a BPE model: {err}"
            ) from err
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(self.EOD_TOKEN, special=True)])
        self._tok = tok
        self._eod = vocab[self.EOD_TOKEN]


def _read_vocab_json(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(f"`vocab_file` {path!r} is not a readable JSON file: {err}") from err
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerFileError(f"`vocab_file` {path!r} must be a JSON object mapping token -> integer id.")
    return vocab


def _read_merges(path: str) -> list[tuple[str, str]]:
    """merges.txt: an optional `#version` line, then one `left right` pair per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerFileError(f"`merge_file` {path!r} could not be read as UTF-8 text: {err}") from err
    merges = []
    for line_no, line in enumerate(lines, start=1):
        if not line or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerFileError(
                f"`merge_file` {path!r} line {line_no} is {line[:80]!r}; each line must be two tokens "
                "separated by one space (GPT-2 merges.txt format)."
            )
        merges.append((parts[0], parts[1]))
    return merges
