"""Seeded shuffle, subset and train/eval split."""

from __future__ import annotations

import datasets
import pytest

from sepo.data import shuffle, subset, train_eval_split
from sepo.errors import ConfigError


@pytest.fixture
def rows():
    return datasets.Dataset.from_dict({"index": list(range(100))})


def test_subset_fraction_and_count_are_deterministic(rows):
    a, b = subset(rows, 0.25, seed=3), subset(rows, 0.25, seed=3)
    assert len(a) == 25 and a["index"] == b["index"]
    assert a["index"] == sorted(a["index"])  # dataset order kept
    assert subset(rows, 0.25, seed=4)["index"] != a["index"]
    assert len(subset(rows, 7, seed=3)) == 7 and len(subset(rows, 1.0, seed=0)) == 100
    # one permutation per seed: a smaller subset lies inside a larger one
    assert set(subset(rows, 10, seed=3)["index"]) <= set(a["index"])


@pytest.mark.parametrize("size", [0, 101, -1, 0.0, 1.5, 0.001, "half", True])
def test_subset_out_of_range_is_a_clear_error(rows, size):
    with pytest.raises(ConfigError, match="subset size"):
        subset(rows, size, seed=0)


def test_train_eval_split_partitions_the_rows(rows):
    train, held_out = train_eval_split(rows, 0.2, seed=1)
    assert len(train) == 80 and len(held_out) == 20
    assert sorted([*train["index"], *held_out["index"]]) == list(range(100))
    again_train, again_eval = train_eval_split(rows, 20, seed=1)
    assert again_eval["index"] == held_out["index"] and again_train["index"] == train["index"]
    with pytest.raises(ConfigError, match="leaves no training rows"):
        train_eval_split(rows, 100, seed=1)


def test_shuffle_is_a_seeded_permutation(rows):
    a = shuffle(rows, seed=5)["index"]
    assert a == shuffle(rows, seed=5)["index"] and sorted(a) == list(range(100)) and a != list(range(100))
