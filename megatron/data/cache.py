"""Index arrays built once per node and cached as .npy files named by a hash of their parameters.

On each node the process with LOCAL_RANK 0 builds any missing arrays and writes them (to a temporary name,
then `os.replace`, so a reader never sees half a file and two nodes sharing a filesystem cannot corrupt
each other); every other process waits at a `torch.distributed.barrier()` (when torch.distributed is
initialized) and then all processes load the arrays memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import numpy as np
import torch.distributed as dist


def params_hash(params: dict) -> str:
    """A short stable hash of JSON-serializable parameters (16 hex digits of SHA-256)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_node_builder() -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return True
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:  # no launcher told us: only global rank 0 builds
        return dist.get_rank() == 0
    return int(local_rank) == 0


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def cached_arrays(
    cache_dir: str, name: str, params: dict, keys: Sequence[str], build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return {key: array} for `keys`, building them with `build()` once per node if not cached.

    Files: `<cache_dir>/<name>_<hash(params)>_<key>.npy`, plus `..._params.json` describing them.
    """
    from megatron.data.integrity import DataFileError, MissingDataFileError

    stem = os.path.join(cache_dir, f"{name}_{params_hash(params)}")
    paths = {k: f"{stem}_{k}.npy" for k in keys}
    if _is_node_builder() and not all(os.path.isfile(p) for p in paths.values()):
        arrays = build()
        try:
            os.makedirs(cache_dir, exist_ok=True)
            for key, path in paths.items():
                _save_atomic(path, arrays[key])
            with open(f"{stem}_params.json.tmp{os.getpid()}", "w") as f:
                json.dump(params, f, indent=1, sort_keys=True, default=str)
            os.replace(f"{stem}_params.json.tmp{os.getpid()}", f"{stem}_params.json")
        except OSError as err:
            raise DataFileError(f"cannot write the data index cache into {cache_dir} ({err.strerror}); set "
                                f"data_cache_dir to a writable directory (by default it is the directory of "
                                f"the data files).") from None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise MissingDataFileError(
            f"index cache files {missing} were not built. With several nodes, the cache directory must be "
            "visible to every process of a node (each node's LOCAL_RANK 0 builds it)."
        )
    return {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
