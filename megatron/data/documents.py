"""Reading raw text documents from jsonl or plain-text files (for preprocessing and tokenizer training).

Formats:
- `jsonl`: one JSON object per line; each requested key (default `text`) holds one document's text.
  Files ending in `.gz` are read through gzip, `.zst` through zstandard. Blank lines are skipped.
- `text`: each file is ONE document (its whole content, UTF-8). Split a big file yourself, or convert it to
  jsonl, if you want finer documents.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator, Sequence

INPUT_FORMATS = ("jsonl", "text")


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):  # the Pile's .jsonl.zst
        import io

        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(
    paths: Sequence[str], input_format: str = "jsonl", jsonl_keys: Sequence[str] = ("text",)
) -> Iterator[dict[str, str]]:
    """Yield one `{key: text}` dict per document, in file order then line order.

    For `text` input the only key is `text`. A jsonl line missing a requested key is an error naming the
    file, the line and the key.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format {input_format!r} is not one of {list(INPUT_FORMATS)}.")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path!r} does not exist.")
        if input_format == "text":
            with _open_text(path) as f:
                yield {"text": f.read()}
            continue
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no} is not valid JSON: {err}") from err
                missing = [k for k in jsonl_keys if k not in record]
                if missing:
                    raise KeyError(f"{path}:{line_no} has no key(s) {missing}; keys present: {sorted(record)}.")
                yield {k: str(record[k]) for k in jsonl_keys}


def total_input_bytes(paths: Sequence[str]) -> int:
    """Sum of input file sizes on disk (for MB/s progress; compressed size for .gz files)."""
    return sum(os.path.getsize(p) for p in paths)
