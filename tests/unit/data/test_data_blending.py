"""Blending by weight: the greedy 'most behind its target' rule, and BlendedDataset."""

from fractions import Fraction

import numpy as np
import pytest

from megatron.data.blending import BlendedDataset, blending_indices, samples_per_dataset


def greedy_reference(weights, n):
    """Megatron's rule, one sample at a time: pick argmax_k w_k * (i + 1) - c_k (ties: lowest k).

    In exact rational arithmetic, so that exact ties are ties (float rounding would break them at random).
    """
    w = [Fraction(str(x)) / sum(Fraction(str(y)) for y in weights) for x in weights]
    counts = [0] * len(w)
    ds_index, ds_sample = [], []
    for i in range(n):
        deficits = [w[k] * (i + 1) - counts[k] for k in range(len(w))]
        k = deficits.index(max(deficits))
        ds_index.append(k)
        ds_sample.append(counts[k])
        counts[k] += 1
    return np.array(ds_index), np.array(ds_sample)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1], [5, 2], [0.123, 0.877], [3, 0.01]])
def test_two_datasets_equal_the_greedy_rule(weights):
    ours_index, ours_sample = blending_indices(weights, 1000)
    ref_index, ref_sample = greedy_reference(weights, 1000)
    np.testing.assert_array_equal(ours_index, ref_index)
    np.testing.assert_array_equal(ours_sample, ref_sample)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 2, 3, 4], [0.01, 0.98, 0.01]])
def test_many_datasets_stay_within_one_sample_of_target(weights):
    n = 1000
    ds_index, ds_sample = blending_indices(weights, n)
    w = np.asarray(weights) / np.sum(weights)
    onehot = np.eye(len(w), dtype=np.int64)[ds_index]  # [n, K]
    counts = np.cumsum(onehot, axis=0)  # [n, K] samples of each dataset after i + 1 picks
    target = np.arange(1, n + 1)[:, None] * w[None, :]
    assert np.abs(counts - target).max() < 1.0
    # the greedy reference is within one sample too, and the totals agree closely
    ref_counts = np.bincount(greedy_reference(weights, n)[0], minlength=len(w))
    assert np.abs(counts[-1] - ref_counts).max() <= 1
    for k in range(len(w)):  # each dataset's samples are used in order 0, 1, 2, ...
        assert ds_sample[ds_index == k].tolist() == list(range(int(np.sum(ds_index == k))))


def test_blended_dataset_reads_from_the_chosen_dataset():
    a = [("a", i) for i in range(40)]
    b = [("b", i) for i in range(40)]
    counts = samples_per_dataset([3, 1], 40)
    assert counts.tolist() == [30, 10]
    blend = BlendedDataset([a, b], [3, 1], 40)
    items = [blend[i] for i in range(len(blend))]
    assert items[:5] == [("a", 0), ("a", 1), ("b", 0), ("a", 2), ("a", 3)]  # tie at sample 1 goes to "a"
    assert sorted(i for name, i in items if name == "b") == list(range(10))
    with pytest.raises(ValueError, match="needs"):
        BlendedDataset([a[:5], b], [3, 1], 40)
    with pytest.raises(ValueError, match="non-negative"):
        blending_indices([-1, 2], 10)
