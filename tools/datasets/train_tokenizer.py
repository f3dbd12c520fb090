"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on jsonl or text files.

    python tools/datasets/train_tokenizer.py --input a.jsonl b.jsonl --vocab-size 8000 \
        --output-dir my_tok [--input-format text] [--jsonl-keys text] [--write-vocab-merges]

Writes `<output-dir>/tokenizer.json` (use it as `vocab_file` with `tokenizer_type: HFTokenizer`).
`<|endoftext|>` is a special token (the end-of-document id). With --write-vocab-merges it also writes
`vocab.json` + `merges.txt` (usable with `tokenizer_type: GPT2BPETokenizer`).
The tokenizer: GPT-2 pre-tokenization (ByteLevel regex, no prefix space), all 256 byte symbols in the
initial alphabet (so any text is encodable), BPE merges learned up to `vocab_size` ids.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from megatron.data.documents import INPUT_FORMATS, iter_documents  # noqa: E402

EOD_TOKEN = "<|endoftext|>"


def train_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    output_dir: str,
    input_format: str = "jsonl",
    jsonl_keys: Sequence[str] = ("text",),
    min_frequency: int = 2,
    write_vocab_merges: bool = False,
    show_progress: bool = True,
) -> str:
    """Train and save; returns the path of the written tokenizer.json."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOD_TOKEN}); got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )

    def texts():
        for doc in iter_documents(inputs, input_format, jsonl_keys):
            yield from doc.values()

    tok.train_from_iterator(texts(), trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tokenizer.json")
    tok.save(path)
    if write_vocab_merges:
        tok.model.save(output_dir)  # vocab.json + merges.txt
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl (.jsonl/.jsonl.gz) or text files")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="jsonl")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"], help="jsonl keys whose text is trained on")
    p.add_argument("--vocab-size", type=int, required=True, help="total ids including <|endoftext|>")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--write-vocab-merges", action="store_true", help="also write vocab.json and merges.txt")
    a = p.parse_args(argv)
    path = train_tokenizer(
        a.input, a.vocab_size, a.output_dir, a.input_format, a.jsonl_keys, a.min_frequency, a.write_vocab_merges
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
