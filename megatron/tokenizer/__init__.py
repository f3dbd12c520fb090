"""Tokenizers: `build_tokenizer(args: TokenizerArgs) -> Tokenizer`.

Every tokenizer has `name`, `vocab_size`, `eod`, `tokenize(text) -> list[int]`, `detokenize(ids) -> str`.
"""

from __future__ import annotations

from megatron.tokenizer.base import Tokenizer, TokenizerFileError
from megatron.tokenizer.byte_level import ByteLevelTokenizer
from megatron.tokenizer.hf import GPT2BPETokenizer, HFTokenizer
from megatron.tokenizer.upstream_types import CharLevelTokenizer, HFGPT2Tokenizer, SPMTokenizer, TiktokenTokenizer

TOKENIZER_TYPES = ("GPT2BPETokenizer", "HFTokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "CharLevelTokenizer",
                   "TiktokenTokenizer", "ByteLevelTokenizer")


def build_tokenizer(args) -> Tokenizer:
    """Build the tokenizer named by `args.tokenizer_type` from `args.vocab_file` / `args.merge_file`.

    `args` is a `TokenizerArgs` (or anything with those three attributes).
    """
    kind = args.tokenizer_type
    if kind == "ByteLevelTokenizer":
        return ByteLevelTokenizer()
    if kind == "HFTokenizer":
        return HFTokenizer(args.vocab_file)
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(args.vocab_file, args.merge_file)
    if kind == "HFGPT2Tokenizer":
        return HFGPT2Tokenizer(args.vocab_file)
    if kind == "SPMTokenizer":
        return SPMTokenizer(args.vocab_file)
    if kind == "CharLevelTokenizer":
        return CharLevelTokenizer()
    if kind == "TiktokenTokenizer":
        return TiktokenTokenizer(args.vocab_file)
    raise ValueError(f"tokenizer_type {kind!r} is not one of {list(TOKENIZER_TYPES)}.")


__all__ = [
    "build_tokenizer",
    "Tokenizer",
    "TokenizerFileError",
    "ByteLevelTokenizer",
    "HFTokenizer",
    "GPT2BPETokenizer",
    "HFGPT2Tokenizer",
    "SPMTokenizer",
    "CharLevelTokenizer",
    "TiktokenTokenizer",
    "TOKENIZER_TYPES",
]
