"""Tokenize jsonl or text files into Megatron/GPT-NeoX `.bin/.idx` datasets.

    python tools/datasets/preprocess_data.py --input data.jsonl --output-prefix data/mydata \
        --tokenizer-type HFTokenizer --vocab-file tokenizer.json --append-eod --workers 4

Writes `<output-prefix>_<key>_document.bin/.idx` for each jsonl key (default `text`), so the config's
`data_path` is `data/mydata_text_document`.

Input formats: `jsonl` (one JSON object per line; `--jsonl-keys` selects the fields, each its own dataset)
or `text` (each input file is one document). `.gz` files are read through gzip.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.data.documents import INPUT_FORMATS  # noqa: E402
from megatron.data.preprocess import preprocess_files  # noqa: E402
from megatron.tokenizer import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True,
                   help="input files (jsonl, jsonl.gz, jsonl.zst, or text); GPT-NeoX's comma-separated list too")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default="jsonl",
                   help="jsonl: one JSON document per line; text: one document per file")
    g.add_argument("--jsonl-keys", nargs="+", default=["text"], help="jsonl keys to tokenize (one dataset each)")
    g.add_argument("--num-docs", type=int, default=None,
                   help="GPT-NeoX's hint of the document count (for its progress bar); the bar counts itself here")
    g.add_argument("--ftfy", action="store_true", help="fix unicode with ftfy.fix_text before tokenizing")
    g = p.add_argument_group("tokenizer (same meaning as the config keys)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=True)
    g.add_argument("--vocab-file", default=None, help="tokenizer.json (HFTokenizer) or vocab.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", default=None, help="merges.txt (GPT2BPETokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document id to each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--dataset-impl", choices=["mmap"], default="mmap", help="GPT-NeoX's flag; mmap is the format")
    g.add_argument("--log-interval", type=int, default=None,
                   help="GPT-NeoX's progress print interval; the progress bar here refreshes itself")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    spec = SimpleNamespace(tokenizer_type=a.tokenizer_type, vocab_file=a.vocab_file, merge_file=a.merge_file)
    inputs = [path for item in a.input for path in item.split(",") if path]
    try:
        written = preprocess_files(
            inputs, a.output_prefix, spec, input_format=a.input_format, jsonl_keys=a.jsonl_keys,
            append_eod=a.append_eod, workers=a.workers, fix_text=a.ftfy,
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"preprocess_data.py: {err}") from None
    for key, prefix in written.items():
        print(f"{key}: wrote {prefix}.bin and {prefix}.idx (data_path: {prefix})")


if __name__ == "__main__":
    main()
