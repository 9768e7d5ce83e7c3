"""Reference log-probs for the losses that compare the policy with a reference (dpo, ipo, rdpo, rpo).

log pi_ref of every response token of the rows a run draws is computed once before training -- sharded over the
processes, each writing its pieces (sepo.stages.shards, as `sepo score` does) -- and cached on disk, keyed by the
reference's weight files, the rows' token ids and the dtype. The reference then leaves memory. A later run on the
same data and reference (or a resumed one, or one with more steps) reuses every cached row and computes only the
rows it lacks: with ``max_steps`` a run computes just the rows its steps draw.

Where the cache lives (``cache_folders``): ``<data>.ref-logps/<key>/`` beside a local data folder, so every run on
that data shares it; when that folder cannot be written (a read-only dataset) or the data is not a local folder,
``<output>/ref-logps/<key>/`` inside the run's own folder. An existing cache beside read-only data is still read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sepo.data.collate import collate_pairs, length_bucketed_batches
from sepo.data.columns import INDEX, REF_LOGPS_COLUMNS, TOKEN_COLUMNS
from sepo.data.rows import pair_lengths, rows_of, unpad_rows
from sepo.data.shared_prefix import with_shared_prefix
from sepo.errors import SepoError
from sepo.io import dataset_fingerprint, fingerprint
from sepo.stages import shards

log = logging.getLogger(__name__)
PIECE_ROWS = 1024  # rows per cached piece: the unit of multi-process work and of resumption


def model_fingerprint(name_or_path: str) -> str:
    """Name plus size and mtime of every weight file of a local model (a changed checkpoint -> a new key)."""
    from sepo.models import resolve_path

    path = Path(resolve_path(name_or_path))
    files = []
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".json") and f.is_file():
                st = f.stat()
                files.append((f.name, st.st_size, st.st_mtime_ns))
    return fingerprint(str(path.resolve()) if path.exists() else name_or_path, files)


def cache_key(reference: str, pairs, dtype: str) -> str:
    """Reference weights, rows and dtype. Not prefix sharing: packed and plain rows give the same log-probs up to
    summation order (~1e-6 in fp32, far below what a loss resolves), so a cache made either way serves both."""
    return fingerprint(model_fingerprint(reference), dataset_fingerprint(pairs, TOKEN_COLUMNS), dtype)


def _writable(folder: Path) -> bool:
    """Whether ``folder`` takes new files, making it if its nearest existing ancestor allows that."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def cache_folders(data: str, run_folder: Path, key: str, accelerator) -> tuple[Path, list[Path]]:
    """-> (the folder new pieces go to, the existing folders pieces are read from). Beside a local data folder when
    it can be written, else in the run's folder (made only when something is written there); an existing cache
    beside read-only data is read as well."""
    beside = Path(data).parent / f"{Path(data).name}.ref-logps" / key if Path(data).is_dir() else None
    inside = run_folder / "ref-logps" / key
    if accelerator.is_main_process and beside is not None:
        _writable(beside)  # made by one process; all then test the same folder
    accelerator.wait_for_everyone()
    if beside is not None and beside.is_dir() and _writable(beside):
        return beside, [beside]
    if beside is not None:
        log.info("%s cannot be written: new reference log-probs are cached in %s", beside.parent, inside)
    return inside, [f for f in (beside, inside) if f is not None and f.is_dir()]


@dataclass
class ReferenceLogps:
    """The cached reference columns of a pairs dataset, looked up by row (``PairDataset(joined=...)``)."""

    dataset: object  # datasets.Dataset of the cached pieces (shards.ROW + REF_LOGPS_COLUMNS)
    position: np.ndarray  # (rows,) position of each pairs row in ``dataset``; -1 where it was not computed
    source: str = ""

    def rows_of(self, rows: Sequence[int]) -> list[dict]:
        positions = self.position[list(rows)]
        if (positions < 0).any():  # a sampler drawing a row the cache was not built for: a bug, not bad input
            raise SepoError(f"no cached reference log-probs for rows {np.asarray(rows)[positions < 0][:5].tolist()} "
                            f"in {self.source}")
        return rows_of(self.dataset, positions.tolist(), REF_LOGPS_COLUMNS)


def compute_reference_logps(reference, ds, pad_token_id: int, device, *, batch_size: int, chunk_size: int,
                            prefix_sharing: bool = False, progress=None) -> dict[str, list]:
    """Per-token reference log-probs of every chosen/rejected response token of ``ds`` (float32 arrays, row order).
    ``prefix_sharing``: each pair's prompt computed once (sepo.data.shared_prefix), where the reference passes the
    probe of ``sepo.prefix_sharing.prefix_sharing_supported``."""
    from sepo.models import response_log_probs
    from sepo.prefix_sharing import prefix_sharing_supported

    out = {c: [None] * len(ds) for c in REF_LOGPS_COLUMNS}
    columns = [*TOKEN_COLUMNS, INDEX] if INDEX in ds.column_names else list(TOKEN_COLUMNS)
    sharing = prefix_sharing and prefix_sharing_supported(reference)
    for positions in length_bucketed_batches(pair_lengths(ds), batch_size, shuffle=False):
        batch = collate_pairs(rows_of(ds, positions, columns), pad_token_id)
        batch = (with_shared_prefix(batch, pad_token_id) if sharing else batch).to(device)
        logps = response_log_probs(reference, batch, chunk_size=chunk_size)  # (2B, R)
        if not torch.isfinite(logps[batch.response_mask]).all():
            raise SepoError(f"the reference gives non-finite log-probs on dataset rows {batch.index.tolist()}; "
                            "check its weights or load it in float32")
        for n, values in enumerate(unpad_rows(logps, batch.response_mask)):
            column = REF_LOGPS_COLUMNS[0] if n < batch.num_pairs else REF_LOGPS_COLUMNS[1]
            out[column][positions[n % batch.num_pairs]] = values
        if progress is not None:
            progress.update(batch.num_pairs)
    return out


def reference_logps(pairs, rows: Sequence[int], *, key: str, data: str, run_folder: Path, accelerator,
                    load_reference: Callable, pad_token_id: int, batch_size: int, chunk_size: int,
                    prefix_sharing: bool = False) -> ReferenceLogps:
    """The reference columns of ``rows`` of ``pairs``: read from the cache, the missing ones computed across the
    processes first (``load_reference()`` is called only then). Every process returns the same lookup."""
    import datasets
    from tqdm.auto import tqdm

    write_to, read_from = cache_folders(data, run_folder, key, accelerator)
    if accelerator.is_main_process:
        shards.remove_partial_pieces(write_to)
    accelerator.wait_for_everyone()
    todo, mine = shards.plan(read_from, rows, PIECE_ROWS, accelerator)
    if todo:
        log.info("reference log-probs of %d rows (%d of the %d this run draws are cached) -> %s", len(todo),
                 len(rows) - len(todo), len(rows), write_to)
        reference = load_reference()
        features = {c: datasets.List(datasets.Value("float32")) for c in REF_LOGPS_COLUMNS}
        with tqdm(total=sum(map(len, mine)), desc="reference log-probs", unit="pair",
                  disable=not accelerator.is_local_main_process or len(todo) < 5 * batch_size) as progress, \
                torch.inference_mode():
            shards.compute_pieces(write_to, mine, lambda piece: (compute_reference_logps(
                reference, pairs.select(piece), pad_token_id, accelerator.device, batch_size=batch_size,
                chunk_size=chunk_size, prefix_sharing=prefix_sharing, progress=progress), {}), features, accelerator)
        del reference
    else:
        log.info("reference log-probs of all %d rows this run draws from the cache %s", len(rows), read_from[0])
    gathered = shards.gather_pieces([*read_from, *([write_to] if write_to not in read_from else [])], len(pairs))
    lookup = ReferenceLogps(gathered.dataset, gathered.position, source=str(write_to))
    missing = int((lookup.position[list(rows)] < 0).sum())
    if missing:
        raise SepoError(f"{missing} rows still lack reference log-probs in {write_to} after computing them; is the "
                        "folder on a filesystem every process sees? Rerun, or delete it")
    return lookup
