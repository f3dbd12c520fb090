"""A tokenizer that needs no files: one id per UTF-8 byte, plus an end-of-document id."""

from __future__ import annotations

import numpy as np


class ByteLevelTokenizer:
    """ids 0..255 are the bytes of the UTF-8 encoding of the text; id 256 is end-of-document.

    `vocab_size` is 257. `detokenize` drops the eod id (and any id above 255, which a model with a padded
    vocabulary may sample) and decodes the bytes as UTF-8, replacing invalid sequences with U+FFFD.
    """

    name = "ByteLevelTokenizer"
    EOD_ID = 256

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return self.EOD_ID

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_to_array(self, text: str) -> np.ndarray:
        """Fast path for preprocessing: the ids as a uint16 array `[n_bytes]`."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def detokenize(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")
