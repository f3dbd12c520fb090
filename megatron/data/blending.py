"""Blending several datasets by weight into one sample stream.

Megatron's rule is greedy: sample i goes to the dataset most behind its target, argmax_k
(w_k * (i + 1) - c_k) with c_k the samples dataset k already has. Looping over samples is too slow in
Python, so we place the j-th sample of dataset k (j = 0, 1, ...) at sort key `(j + 0.5) / w_k` and read
the merged order (ties go to the lower dataset index, as argmax does). For two datasets this is exactly the greedy rule
(the greedy picks k iff its deficit exceeds 1/2, i.e. i + 1 > (c_k + 0.5) / w_k); for more it is the
Sainte-Lague apportionment, which keeps every prefix within one sample of its target:
|c_k(n) - w_k * n| < 1 for every n and k. O(n log n) in numpy.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron.data.cache import cached_arrays


def normalize_weights(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blending weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def blending_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset serves each blended sample, and which of its samples.

    Returns `dataset_index` int16 `[num_samples]` and `dataset_sample_index` int64 `[num_samples]` (the
    j-th time dataset k appears, its sample j).
    """
    w = normalize_weights(weights)
    ids, ranks, keys = [], [], []
    for k, wk in enumerate(w):  # a loop over datasets, not samples
        if wk == 0:
            continue
        n_k = int(np.ceil(wk * num_samples)) + 1  # enough candidates: c_k(n) < w_k * n + 1
        j = np.arange(n_k, dtype=np.int64)
        ids.append(np.full(n_k, k, dtype=np.int16))
        ranks.append(j)
        keys.append((j + 0.5) / wk)
    ids, ranks, keys = np.concatenate(ids), np.concatenate(ranks), np.concatenate(keys)
    # keys that are mathematically equal (a tie, which goes to the lower dataset index) can differ in the
    # last bits of float64: compare them on 12 significant digits
    integer_digits = int(np.ceil(np.log10(keys.max() + 1.0)))
    keys = np.round(keys * 10.0 ** (12 - integer_digits))
    order = np.lexsort((ids, keys))[:num_samples]  # by key, then dataset index
    return ids[order], ranks[order]


class BlendedDataset(torch.utils.data.Dataset):
    """`num_samples` samples drawn from `datasets` in proportion to `weights` (see module docstring).

    Each dataset must hold at least `samples_per_dataset(weights, num_samples)[k]` samples.
    """

    def __init__(self, datasets, weights, num_samples: int, cache_dir: str | None = None, name: str = "blend"):
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        if len(self.weights) != len(self.datasets):
            raise ValueError(f"{len(self.datasets)} datasets but {len(self.weights)} weights")

        def build():
            ds_index, ds_sample = blending_indices(self.weights, num_samples)
            return {"dataset_index": ds_index, "dataset_sample_index": ds_sample}

        if cache_dir is None:
            arrays = build()
        else:
            params = {"weights": self.weights.tolist(), "num_samples": num_samples, "format": 1}
            arrays = cached_arrays(cache_dir, name, params, ("dataset_index", "dataset_sample_index"), build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for k, ds in enumerate(self.datasets):
            needed = int(np.count_nonzero(self.dataset_index == k))
            if needed > len(ds):
                raise ValueError(f"blended dataset {k} has {len(ds)} samples but the blend needs {needed}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int):
        k = int(self.dataset_index[idx])
        return self.datasets[k][int(self.dataset_sample_index[idx])]


def samples_per_dataset(weights, num_samples: int) -> np.ndarray:
    """How many samples each dataset serves in a blend of `num_samples` (int64 `[n_datasets]`)."""
    ds_index, _ = blending_indices(weights, num_samples)
    return np.bincount(ds_index, minlength=len(weights)).astype(np.int64)
