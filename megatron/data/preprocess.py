"""Tokenize raw documents into `<output_prefix>_<key>_document.bin/.idx` (GPT-NeoX naming).

`preprocess_documents` is the library function; `tools/datasets/preprocess_data.py` is its command line.
Each document becomes one item (and one document) of the indexed dataset; with `append_eod` the
tokenizer's end-of-document id is appended to every document. Documents are tokenized by a pool of
`workers` processes and written in input order, so the output does not depend on `workers`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from types import SimpleNamespace
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from megatron.data.documents import iter_documents, total_input_bytes
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype, index_file_path
from megatron.tokenizer import build_tokenizer

_worker_state: dict = {}


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """GPT-NeoX's name for the dataset of one jsonl key: `<output_prefix>_<key>_document`."""
    return f"{output_prefix}_{key}_document"


def _init_worker(tokenizer_spec: SimpleNamespace, append_eod: bool, fix_text: bool = False) -> None:
    _worker_state["tokenizer"] = build_tokenizer(tokenizer_spec)
    _worker_state["append_eod"] = append_eod
    _worker_state["ftfy"] = fix_text


def _encode_document(doc: dict[str, str]) -> tuple[dict[str, np.ndarray], int]:
    """Tokenize each key's text; returns ({key: int64 ids [n]}, number of UTF-8 bytes read)."""
    tokenizer = _worker_state["tokenizer"]
    encoded, n_bytes = {}, 0
    for key, text in doc.items():
        n_bytes += len(text.encode("utf-8"))
        if _worker_state.get("ftfy"):
            import ftfy

            text = ftfy.fix_text(text)
        if not text:  # an empty document is skipped, as GPT-NeoX does
            encoded[key] = None
            continue
        if hasattr(tokenizer, "tokenize_to_array"):
            ids = tokenizer.tokenize_to_array(text).astype(np.int64)
        else:
            ids = np.asarray(tokenizer.tokenize(text), dtype=np.int64)
        if _worker_state["append_eod"]:
            ids = np.append(ids, np.int64(tokenizer.eod))
        encoded[key] = ids
    return encoded, n_bytes


def preprocess_documents(
    documents: Iterable[dict[str, str]],
    output_prefix: str,
    tokenizer_spec,
    keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    total_bytes: int | None = None,
    desc: str = "tokenizing",
    show_progress: bool = True,
    output_prefixes: dict[str, str] | None = None,
    fix_text: bool = False,
) -> dict[str, str]:
    """Tokenize `documents` (dicts `{key: text}`) and write one indexed dataset per key.

    `tokenizer_spec` has `tokenizer_type`, `vocab_file`, `merge_file` (a TokenizerArgs). Output prefixes
    are `<output_prefix>_<key>_document` unless `output_prefixes` maps keys to explicit prefixes.
    Returns {key: prefix written}. The progress bar shows docs/s and input MB/s. Empty documents are
    skipped; `fix_text` runs ftfy.fix_text first. The files are written under temporary names and renamed
    over `<prefix>.bin/.idx` only when complete (a failure leaves any older pair untouched and no partial
    files); no document at all is an error (ValueError), and nothing is written.
    """
    spec = SimpleNamespace(
        tokenizer_type=tokenizer_spec.tokenizer_type,
        vocab_file=tokenizer_spec.vocab_file,
        merge_file=tokenizer_spec.merge_file,
    )
    vocab_size = build_tokenizer(spec).vocab_size  # also fails early on bad tokenizer files
    dtype = best_fitting_dtype(vocab_size)
    prefixes = dict(output_prefixes) if output_prefixes else {k: output_prefix_for_key(output_prefix, k) for k in keys}
    for prefix in prefixes.values():
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    builders = {k: IndexedDatasetBuilder(prefixes[k] + ".bin" + suffix, dtype=dtype) for k in keys}
    counts = {k: 0 for k in keys}
    try:
        _write(builders, counts, documents, keys, spec, append_eod, fix_text, workers, total_bytes, desc,
               show_progress)
        empty = [k for k in keys if counts[k] == 0]
        if empty:
            raise ValueError(f"no documents to write for key(s) {empty}: the input holds no non-empty "
                             f"document{'' if len(keys) == 1 else ' under those keys'}; nothing was written. "
                             f"Check the input files and --jsonl-keys.")
        for key in keys:
            builders[key].finalize(index_file_path(prefixes[key]) + suffix)
        for key in keys:  # complete: the new pair replaces any older one (the .idx last)
            os.replace(prefixes[key] + ".bin" + suffix, prefixes[key] + ".bin")
            os.replace(index_file_path(prefixes[key]) + suffix, index_file_path(prefixes[key]))
    finally:
        for key in keys:
            for path in (prefixes[key] + ".bin" + suffix, index_file_path(prefixes[key]) + suffix):
                if os.path.exists(path):
                    os.remove(path)
    return prefixes


def _write(builders, counts, documents, keys, spec, append_eod, fix_text, workers, total_bytes, desc,
           show_progress) -> None:
    """Tokenize `documents` into the builders (in input order), counting the documents per key."""
    if workers > 1:
        pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(spec, append_eod, fix_text))
        encoded_stream = pool.imap(_encode_document, documents, chunksize=16)
    else:
        pool = None
        _init_worker(spec, append_eod, fix_text)
        encoded_stream = map(_encode_document, documents)

    start, n_bytes_done = time.perf_counter(), 0
    bar = tqdm(
        desc=desc, unit=" docs", disable=not show_progress, file=sys.stderr, mininterval=0.5,
        postfix={"MB/s": "0.0"} if total_bytes is None else {"MB/s": "0.0", "of MB": f"{total_bytes / 1e6:.1f}"},
    )
    try:
        for encoded, n_bytes in encoded_stream:
            for key in keys:
                if encoded[key] is None:
                    continue
                builders[key].add_item(encoded[key])
                builders[key].end_document()
                counts[key] += 1
            n_bytes_done += n_bytes
            bar.update(1)
            if bar.n % 256 == 0:
                bar.set_postfix_str(f"{n_bytes_done / 1e6 / max(time.perf_counter() - start, 1e-9):.1f} MB/s",
                                    refresh=False)
    finally:
        bar.set_postfix_str(f"{n_bytes_done / 1e6 / max(time.perf_counter() - start, 1e-9):.1f} MB/s")
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()


def preprocess_files(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_spec,
    input_format: str = "jsonl",
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    show_progress: bool = True,
    fix_text: bool = False,
) -> dict[str, str]:
    """`preprocess_documents` over jsonl or text files (see `megatron.data.documents` for the formats).
    A missing input file is a FileNotFoundError naming it, raised before anything is written."""
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"input file(s) {missing} do not exist; nothing was written. Fix --input.")
    keys = ("text",) if input_format == "text" else tuple(jsonl_keys)
    return preprocess_documents(
        iter_documents(inputs, input_format, keys),
        output_prefix,
        tokenizer_spec,
        keys=keys,
        append_eod=append_eod,
        workers=workers,
        total_bytes=total_input_bytes(inputs),
        show_progress=show_progress,
        fix_text=fix_text,
    )
