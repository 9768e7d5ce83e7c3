"""Per-row results computed in pieces across processes, each piece written atomically, then gathered.

Shared by `sepo score` (token rewards of every row) and `sepo train`'s reference cache (reference log-probs of the
rows a run draws). The rows still to do are cut into pieces of at most ``piece_rows`` rows; piece k goes to process
``k % num_processes``. A piece is a small dataset (``row`` plus the value columns, and its ``stats`` in the
metadata) saved atomically in one folder, so a killed run keeps its finished pieces and a rerun computes only the
rows no piece holds. Every process then reads all pieces: the gather goes through the filesystem, which every
process must see (as it must see the output folder, where accelerate's checkpoints go).

    todo, mine = plan(folder, rows, piece_rows, accelerator)   # every row not cached yet; this process's pieces
    compute_pieces(folder, mine, compute, features, accelerator)
    gathered = gather_pieces(folder, num_rows)             # .dataset, .position (row -> position or -1), .stats
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sepo.errors import SepoError
from sepo.io import METADATA_FILE, load_dataset_dir, read_metadata, save_dataset

log = logging.getLogger(__name__)
ROW = "row"
PIECE_PREFIX = "piece-"


def _folders(folders: Path | Sequence[Path]) -> list[Path]:
    return [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]


def piece_dirs(folders: Path | Sequence[Path]) -> list[Path]:
    """Finished pieces (those with their metadata) of one folder or several, in row order."""
    found = [d for folder in _folders(folders) if folder.is_dir() for d in folder.iterdir()
             if d.name.startswith(PIECE_PREFIX) and (d / METADATA_FILE).is_file()]
    return sorted(found, key=lambda d: d.name)


def covered_rows(folders: Path | Sequence[Path]) -> np.ndarray:
    """Rows some finished piece holds."""
    import pyarrow.compute as pc

    from sepo.io import arrow_table

    parts = [pc.unique(arrow_table(load_dataset_dir(d)[0]).column(ROW)).to_numpy() for d in piece_dirs(folders)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def missing_rows(folders: Path | Sequence[Path], rows: Sequence[int]) -> list[int]:
    """``rows`` that no finished piece holds (in order)."""
    rows = np.asarray(list(rows), dtype=np.int64)
    return rows[~np.isin(rows, covered_rows(folders))].tolist()


def plan(folders: Path | Sequence[Path], rows: Sequence[int], piece_rows: int, accelerator) -> tuple[list[int],
                                                                                                   list[list[int]]]:
    """-> (the rows no finished piece holds, this process's pieces of them). Every process reads the folders before
    any writes (a barrier), so all agree on the pieces; piece k goes to process ``k % num_processes``. Pieces are
    at most ``piece_rows`` rows, and smaller when that gives every process a share."""
    todo = missing_rows(folders, rows)
    accelerator.wait_for_everyone()
    size = max(1, min(piece_rows, math.ceil(len(todo) / accelerator.num_processes)))
    pieces = [todo[s : s + size] for s in range(0, len(todo), size)]
    return todo, pieces[accelerator.process_index :: accelerator.num_processes]


def compute_pieces(folder: Path, pieces: Sequence[list[int]],
                   compute: Callable[[list[int]], tuple[dict[str, list], dict]], features, accelerator) -> None:
    """Compute and save each of this process's ``pieces``; returns when every process is done.

    ``compute(rows) -> (columns, stats)``: one value list per column, in the order of ``rows``, and numeric stats
    (summed over pieces by ``gather_pieces``). ``features``: the ``datasets.Features`` of the value columns."""
    import datasets

    from sepo.io import datasets_progress

    features = datasets.Features({ROW: datasets.Value("int64"), **features})
    for rows in pieces:
        columns, stats = compute(rows)
        piece = datasets.Dataset.from_dict({ROW: rows, **columns}, features=features)
        with datasets_progress(False):  # one "Saving the dataset" bar per piece would bury the caller's progress bar
            save_dataset(piece, folder / f"{PIECE_PREFIX}{rows[0]:010d}", {"stage": "piece", "rows": len(rows),
                                                                            "stats": stats}, overwrite=True)
    accelerator.wait_for_everyone()


@dataclass
class Gathered:
    dataset: object  # datasets.Dataset: every piece's rows (ROW + value columns), pieces in row order
    position: np.ndarray  # (num_rows,) int64: the dataset position holding each row, -1 where no piece has it
    stats: dict = field(default_factory=dict)  # every piece's stats, summed

    @property
    def complete(self) -> bool:
        return bool((self.position >= 0).all())

    def in_row_order(self):
        """The value columns of rows 0..num_rows-1 in order (every row must be covered)."""
        ds = self.dataset.remove_columns(ROW)
        if np.array_equal(self.position, np.arange(len(self.position))):
            return ds
        return ds.select(self.position.tolist())


def gather_pieces(folders: Path | Sequence[Path], num_rows: int) -> Gathered:
    """Every finished piece of one folder or several, indexed by row (memory-mapped; nothing is copied)."""
    import datasets

    from sepo.io import arrow_table

    dirs = piece_dirs(folders)
    parts = [load_dataset_dir(d)[0] for d in dirs]
    ds = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({ROW: []})
    rows = arrow_table(ds).column(ROW).to_numpy() if len(ds) else np.zeros(0, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise SepoError(f"{', '.join(map(str, _folders(folders)))} hold rows outside 0..{num_rows - 1}: they belong to "
                        "other data; delete them")
    position = np.full(num_rows, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    stats: dict = {}
    for d in dirs:
        for k, v in read_metadata(d).get("stats", {}).items():
            stats[k] = stats.get(k, 0) + v
    return Gathered(ds, position, stats)


def remove_partial_pieces(folder: Path) -> None:
    """Temporary piece folders a killed process left behind (``atomic_dir``'s hidden siblings). Call it from one
    process, before any process computes."""
    if folder.is_dir():
        for d in folder.iterdir():
            if d.name.startswith(f".{PIECE_PREFIX}") and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
