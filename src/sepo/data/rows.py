"""Reading pair rows out of Arrow datasets, and writing per-token results back as rows.

Shared by every stage that runs a model over pairs (`sepo score`, `sepo train` and its reference cache):

    rows_of(ds, positions, columns)      the rows at ``positions`` as dicts (what ``collate_pairs`` takes)
    list_lengths(ds, column)             the length of every list in a column, read from Arrow (no Python lists)
    pair_lengths(ds)                     prompt + the longer response per row: what length bucketing sorts on
    unpad_rows(grid, mask)               (N, R) padded grid -> N per-row float32 arrays (the inverse of collation)
    flattened(ds)                        a selection as its own table, in a temporary file, never beside the data
"""

from __future__ import annotations

from collections.abc import Sequence

from sepo.data.columns import TOKEN_COLUMNS
from sepo.io import datasets_progress


def rows_of(ds, positions: Sequence[int], columns: Sequence[str]) -> list[dict]:
    """The rows of ``ds`` at ``positions`` (in that order), restricted to ``columns``, as dicts."""
    picked = ds.select_columns(list(columns))[list(positions)]
    return [dict(zip(picked, values)) for values in zip(*picked.values())]


def list_lengths(ds, column: str):
    """(rows,) int array: the length of every list in ``column``. A selection (``ds.select``) is read through its
    index mapping: nothing is flattened, so nothing is written beside the data (datasets would cache it there)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.data.table.column(column))
    if ds._indices is not None:
        lengths = lengths.take(ds._indices.column(0))
    return lengths.to_numpy(zero_copy_only=False)


def pair_lengths(ds) -> list[int]:
    """prompt + the longer response per row (the longer of the pair's two sequences)."""
    import numpy as np

    prompt, chosen, rejected = (list_lengths(ds, c) for c in TOKEN_COLUMNS)
    return (prompt + np.maximum(chosen, rejected)).tolist()


def unpad_rows(grid, mask) -> list:
    """A right-padded (N, R) grid -> N float32 numpy arrays, row n cut to ``mask[n].sum()`` entries.
    ``mask`` (N, R) bool marks the real entries (they come first in every row)."""
    values, lengths = grid.float().cpu(), mask.sum(1).tolist()
    return [values[n, :length].numpy() for n, length in enumerate(lengths)]


def flattened(ds):
    """``ds`` with its index mapping (from ``select``, a subset, a split) applied. datasets would write the result
    as a cache file beside the data it was loaded from -- a folder a stage must not write (it may be read-only, and
    it is another stage's output) -- so caching is off meanwhile: the table goes to a temporary file instead."""
    import datasets

    if ds._indices is None:
        return ds
    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        with datasets_progress(False):
            return ds.flatten_indices()
    finally:
        if was_enabled:
            datasets.enable_caching()
