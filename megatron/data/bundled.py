"""The bundled corpus: real text found on every Python installation, tokenized on first use.

Documents, in this fixed order:
1. every topic of `pydoc_data.topics` (the English prose of Python's language reference, as shown by
   `help()`), sorted by topic name;
2. the full source of every `.py` module of the standard library (code, docstrings and comments), sorted
   by path; test suites (`test`, `tests`, `idle_test`) and site-packages are left out, since not every
   installation ships them.

About 13 MB of text (its exact content follows the Python version). It is tokenized with the
ByteLevelTokenizer (one id per UTF-8 byte, eod = 256 appended to each document) into
`<prefix>.bin/.idx`, by default `data/bundled/pystdlib_text_document`, in a few seconds. The build takes a
file lock (`<prefix>.lock`) so concurrent ranks or tests do not collide, writes to temporary names and
renames them into place, so a reader sees either nothing or the complete dataset.
"""

from __future__ import annotations

import fcntl
import os
import sys
import sysconfig
import time
from types import SimpleNamespace
from typing import Iterator

from megatron.data.indexed_dataset import data_file_path, dataset_exists, index_file_path

BUNDLED_NAME = "pystdlib_text_document"
DEFAULT_PREFIX = os.path.join("data", "bundled", BUNDLED_NAME)
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def is_bundled_prefix(prefix: str) -> bool:
    """True when `prefix` names the bundled corpus (its file name is `pystdlib_text_document`)."""
    return os.path.basename(prefix) == BUNDLED_NAME


def iter_bundled_documents() -> Iterator[dict[str, str]]:
    """The corpus documents as `{"text": ...}`, in a deterministic order (see the module docstring)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"text": topics[name]}
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for file_name in sorted(files):
            if file_name.endswith(".py"):
                with open(os.path.join(root, file_name), "rb") as f:
                    yield {"text": f.read().decode("utf-8", errors="replace")}


def ensure_bundled_data(prefix: str = DEFAULT_PREFIX, root: str | None = None, show_progress: bool = True) -> str:
    """Build `<prefix>.bin/.idx` if missing; return the absolute prefix.

    A relative `prefix` is resolved against `root` (default: the current working directory, the project
    root where users run deepy.py).
    """
    path = prefix if os.path.isabs(prefix) else os.path.join(root or os.getcwd(), prefix)
    path = os.path.abspath(path)
    if dataset_exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not dataset_exists(path):  # another process may have built it while we waited
            _build(path, show_progress)
    return path


def _build(path: str, show_progress: bool) -> None:
    from megatron.data.preprocess import preprocess_documents  # imported late: pulls in the tokenizers

    if show_progress:
        print(f"building the bundled corpus {path} (Python stdlib + docs, once) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = f"{path}.tmp{os.getpid()}"
    spec = SimpleNamespace(tokenizer_type="ByteLevelTokenizer", vocab_file=None, merge_file=None)
    try:
        preprocess_documents(
            iter_bundled_documents(), tmp, spec, keys=("text",), append_eod=True, workers=1,
            desc="bundled corpus", show_progress=show_progress, output_prefixes={"text": tmp},
        )
        os.replace(data_file_path(tmp), data_file_path(path))
        os.replace(index_file_path(tmp), index_file_path(path))  # the .idx last: its presence means done
    finally:
        for leftover in (data_file_path(tmp), index_file_path(tmp)):
            if os.path.exists(leftover):
                os.remove(leftover)
    if show_progress:
        size_mb = os.path.getsize(data_file_path(path)) / 1e6
        print(f"built {path}.bin ({size_mb:.1f} MB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
