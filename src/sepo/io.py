"""Atomic hand-offs between stages: every output folder is written under a temporary name and renamed.

A stage's output folder holds a `datasets` Arrow dataset (``save_to_disk``) plus ``sepo_metadata.json``
saying which models, tokenizer and settings made it. A crash never leaves a half-written folder under the
final name, so "the folder exists" means "the stage finished".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sepo.errors import SepoError

if TYPE_CHECKING:
    import torch

METADATA_FILE = "sepo_metadata.json"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on any exception it is removed."""
    final = Path(path)
    if final.exists() and not overwrite:
        raise SepoError(f"{final} already exists; choose another output folder or pass overwrite=true")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` while a run writes into it: a second run of the same output fails at
    once instead of both writing the same files. The operating system releases it when the process ends, however
    it ends (a killed run leaves no stale lock)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; run unguarded
        yield folder
        return
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- held for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SepoError(f"{folder} is in use by another `{command}` run (pid {holder}); wait for it to finish "
                            "or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield folder
    finally:
        handle.close()  # closing releases the lock


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_metadata(folder: str | os.PathLike, metadata: dict) -> None:
    atomic_write_json(Path(folder) / METADATA_FILE, metadata)


def read_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise SepoError(f"{folder} has no {METADATA_FILE}: it was not written by a sepo stage (or the stage did not finish)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SepoError(f"{path} is not valid JSON ({e}); delete the folder and rerun the stage that wrote it") from None


def save_dataset(dataset, folder: str | os.PathLike, metadata: dict, *, overwrite: bool = False) -> Path:
    """Save a `datasets.Dataset` plus its metadata JSON atomically."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        dataset.save_to_disk(str(tmp))
        write_metadata(tmp, metadata)
    return Path(folder)


def load_dataset_dir(folder: str | os.PathLike, required_columns: Iterable[str] = (), *, produced_by: str = "") -> tuple[Any, dict]:
    """Load a stage's output folder; a missing column names the stage that adds it."""
    import datasets

    folder = Path(folder)
    if not folder.is_dir():
        raise SepoError(f"{folder} does not exist or is not a folder")
    metadata = read_metadata(folder)
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for a broken folder
        raise SepoError(f"{folder} is not a readable datasets folder ({type(e).__name__}: {e})") from None
    missing = [c for c in required_columns if c not in ds.column_names]
    if missing:
        by = f"; it is made by `{produced_by}`" if produced_by else ""
        raise SepoError(f"{folder} lacks column(s) {', '.join(missing)}{by}")
    return ds, metadata


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (used to key caches)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def arrow_table(dataset):
    """The Arrow table behind a ``datasets.Dataset`` in row order (an index mapping, e.g. from ``select``,
    applied first), for column-wise reads with no Python lists."""
    return (dataset.flatten_indices() if dataset._indices is not None else dataset).data.table


def flat_column(table, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A list column of an Arrow table -> (flat values, lengths (N,) long), with no Python lists."""
    import pyarrow.compute as pc
    import torch

    column = table.column(name)
    lengths = torch.from_numpy(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("int64"))
    values = torch.from_numpy(pc.list_flatten(column).to_numpy(zero_copy_only=False).copy())
    return values, lengths


def dataset_fingerprint(ds, columns: Iterable[str]) -> str:
    """Hash of the token-id list columns of every row, in order: results keyed by it (a resumed score run,
    a reference log-prob cache) belong to exactly these rows."""
    import pyarrow.compute as pc

    h = hashlib.sha256(str(len(ds)).encode())
    table = arrow_table(ds)
    for name in columns:
        column = table.column(name)
        h.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
        h.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()[:16]
