"""Deterministic row selection: shuffle, a random subset (the oracle's training data), a train/eval split.

Sizes are a fraction when given as a float in (0, 1] and a count when given as an int. Rows are drawn from
one seeded permutation, so for a fixed seed a smaller subset is contained in a larger one, and the selected
rows keep their order in the dataset.
"""

from __future__ import annotations

import numpy as np

from sepo.errors import ConfigError


def resolve_size(size: float | int, total: int, *, what: str = "size") -> int:
    """A fraction (float in (0, 1]) or a count (int in [1, total]) -> a number of rows."""
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{what} must be a fraction in (0, 1] or a row count, got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0 < size <= 1:
            raise ConfigError(f"{what}={size} is a fraction and must be in (0, 1]; give an integer for a row count")
        count = round(float(size) * total)
        if count < 1:
            raise ConfigError(f"{what}={size} of {total} rows selects no row; use a larger fraction")
        return count
    if not 1 <= size <= total:
        raise ConfigError(f"{what}={size} rows is out of range: the dataset has {total} rows")
    return int(size)


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def shuffle(dataset, seed: int):
    """All rows in a seeded random order (the same order for the same seed and length)."""
    return dataset.select(_permutation(len(dataset), seed).tolist())


def subset(dataset, size: float | int, seed: int):
    """A seeded random subset of ``size`` rows (see the module docstring), in dataset order."""
    count = resolve_size(size, len(dataset), what="subset size")
    return dataset.select(sorted(_permutation(len(dataset), seed)[:count].tolist()))


def train_eval_split(dataset, eval_size: float | int, seed: int):
    """-> ``(train, eval)``: ``eval_size`` rows held out at random; both parts keep dataset order."""
    count = resolve_size(eval_size, len(dataset), what="eval size")
    if count >= len(dataset):
        raise ConfigError(f"eval size {eval_size} leaves no training rows out of {len(dataset)}")
    order = _permutation(len(dataset), seed)
    return dataset.select(sorted(order[count:].tolist())), dataset.select(sorted(order[:count].tolist()))
