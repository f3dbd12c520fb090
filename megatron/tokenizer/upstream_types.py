"""GPT-NeoX's other tokenizer types, with upstream's ids and end-of-document rules; no downloads.

- `SPMTokenizer`: a SentencePiece `.model` (vocab_file). ids are SentencePiece's (`encode(text)`, no BOS/EOS
  added); vocab_size is the piece count; eod is the id of the piece `<|endoftext|>`, which, as upstream's
  `piece_to_id`, is the unknown-piece id when the model has no such piece (Llama's tokenizer.model). This
  looks like an upstream bug, but it is what every GPT-NeoX dataset made with such a model contains.
- `HFGPT2Tokenizer`: GPT-2's byte-level BPE through transformers' GPT2TokenizerFast, from a local directory
  (vocab_file) holding vocab.json and merges.txt (or a model name already in the local HF cache; never
  downloaded). As upstream, `<|padding|>` is added as a pad token (counted in vocab_size); eod is the eos id.
- `CharLevelTokenizer`: one id per UTF-8 byte of the text, vocab_size 512 (upstream's fixed size), eod 0.
  detokenize decodes the ids below 256 as UTF-8 bytes (upstream maps each id to one character instead).
- `TiktokenTokenizer`: a tiktoken encoding: an encoding name (cl100k_base, ...) that tiktoken loads from its
  local cache, or a `.tiktoken` file (base64 token and rank per line) with GPT-2's split pattern and
  `<|endoftext|>` added after the ranks. eod is the encoding's end-of-text id.
"""

from __future__ import annotations

import os

from megatron.tokenizer.base import TokenizerFileError, require_file


class SPMTokenizer:
    name = "SPMTokenizer"

    def __init__(self, vocab_file: str | None):
        import sentencepiece

        path = require_file(vocab_file, "vocab_file", self.name, "a SentencePiece .model file")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with its own text
            raise TokenizerFileError(f"`vocab_file` {path!r} is not a SentencePiece model: {err}") from err
        self._eod = self._sp.piece_to_id("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFGPT2Tokenizer:
    name = "HFGPT2Tokenizer"
    PAD_TOKEN = "<|padding|>"

    def __init__(self, vocab_file: str | None):
        import transformers

        if vocab_file is None:
            raise TokenizerFileError("tokenizer_type HFGPT2Tokenizer needs `vocab_file`: a directory holding GPT-2's "
                                     "vocab.json and merges.txt (upstream would download `gpt2`; nothing is "
                                     "downloaded here).")
        try:
            self._tok = transformers.GPT2TokenizerFast.from_pretrained(vocab_file, local_files_only=True)
        except Exception as err:
            raise TokenizerFileError(f"`vocab_file` {vocab_file!r} for HFGPT2Tokenizer could not be loaded: a "
                                     f"directory with vocab.json and merges.txt is expected ({err}).") from err
        self._tok.add_special_tokens({"pad_token": self.PAD_TOKEN})
        if self._tok.eos_token_id is None:
            raise TokenizerFileError(f"`vocab_file` {vocab_file!r} has no eos token (<|endoftext|>).")

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class CharLevelTokenizer:
    name = "CharLevelTokenizer"
    VOCAB_SIZE = 512

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    @property
    def eod(self) -> int:
        return 0

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    name = "TiktokenTokenizer"
    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str | None):
        import tiktoken

        if vocab_file is None:
            raise TokenizerFileError("tokenizer_type TiktokenTokenizer needs `vocab_file`: an encoding name such as "
                                     "cl100k_base, or a .tiktoken file.")
        if os.path.isfile(vocab_file):
            from tiktoken.load import load_tiktoken_bpe
            from tiktoken_ext.openai_public import r50k_pat_str

            try:
                ranks = load_tiktoken_bpe(vocab_file)
            except Exception as err:
                raise TokenizerFileError(f"`vocab_file` {vocab_file!r} is not a .tiktoken file (base64 token and "
                                         f"rank per line): {err}") from err
            self._enc = tiktoken.Encoding(name=os.path.basename(vocab_file), pat_str=r50k_pat_str,
                                          mergeable_ranks=ranks, special_tokens={self.EOD_TOKEN: len(ranks)})
        else:
            try:
                self._enc = tiktoken.get_encoding(vocab_file)
            except Exception as err:
                raise TokenizerFileError(f"tiktoken encoding {vocab_file!r} could not be loaded ({err}); name an "
                                         f"encoding in tiktoken's local cache (TIKTOKEN_CACHE_DIR) or a .tiktoken "
                                         f"file.") from err

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eod(self) -> int:
        return self._enc.eot_token

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def detokenize(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids if int(i) != self.eod])
