"""Atomic hand-offs between stages, and what a run owns: its output folder, locked, checked writable first.

A stage's output folder holds a `datasets` Arrow dataset (``save_to_disk``) plus ``sepo_metadata.json``
saying which models, tokenizer and settings made it. A crash never leaves a half-written folder under the
final name, so "the folder exists" means "the stage finished".

Every stage's ``run(cfg)`` is wrapped in :func:`owns_output`: before any model is loaded it refuses an output
that cannot be written (:func:`check_writable`), then holds a lock on it (:func:`output_lock`) so a second run
into the same folder stops with a message naming the first, and turns a full, read-only or forbidden
filesystem met while writing into one line (:func:`storage_error`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sepo.errors import SepoError

if TYPE_CHECKING:
    import torch

METADATA_FILE = "sepo_metadata.json"
LOCK_SUFFIX = ".lock"


# ---------------------------------------------------------------------------------------------- filesystem faults

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# how libraries that wrap the OS error report a full disk: safetensors (Rust: "os error 28", StorageFull),
# pyarrow and fsspec (the errno text), huggingface / torch ("No space left on device")
_NO_SPACE_TEXT = re.compile(r"no space left on device|disk quota exceeded|storagefull|os error 28|errno 28", re.I)
# torch.save's stream writer drops the errno ("file write failed"); the free space then tells what happened
_WRITE_FAILED_TEXT = re.compile(r"file write failed|unexpected pos", re.I)
_NEARLY_FULL_BYTES = 64 * 2**20


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(_nearest_existing(path)).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def storage_error(err: BaseException, where: str | os.PathLike) -> SepoError | None:
    """The one-line error for a write that failed because of the filesystem -- full, read-only, or not ours to
    write -- or None when ``err`` is anything else. ``where`` is the folder being written (the message names it,
    unless the OS error names a file outside it, e.g. a cache). Looks through wrapped errors and through the
    texts of libraries that do not keep the errno (safetensors' SafetensorError, torch's stream writer)."""
    where = Path(where)
    for e in _chain(err):
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        target = where
        filename = getattr(e, "filename", None) if isinstance(e, OSError) else None
        if filename and not _inside(Path(str(filename)), where):
            target = Path(str(filename)).parent
        if code in _NO_SPACE_ERRNOS or _NO_SPACE_TEXT.search(str(e)) or (
                _WRITE_FAILED_TEXT.search(str(e)) and _nearly_full(target)):
            if target != where:  # e.g. datasets' temporary Arrow files, under TMPDIR
                return SepoError(f"no space left on device while writing {target} (working files, not the output "
                                 f"{where}); free space there, or set TMPDIR to a folder with room")
            return SepoError(f"no space left on device while writing {target}; free space or choose another output")
        if code == errno.EROFS:
            return SepoError(f"cannot write {target}: it is on a read-only filesystem; choose another output")
        if code in (errno.EACCES, errno.EPERM) and filename:
            return SepoError(f"cannot write {target}: permission denied ({filename}); choose another output, or "
                             "fix its permissions")
    return None


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder``, inside it, or one of the siblings sepo writes beside it (``.name.tmp-*``)."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return (path == folder or folder in path.parents
            or any(p.parent == folder.parent and p.name.startswith(f".{folder.name}.") for p in (path, *path.parents)))


def check_writable(output: str | os.PathLike) -> None:
    """Refuse, before any work is done, an output folder that cannot be written: an existing file in its place,
    a read-only filesystem, no permission, no space for one more file. Writes (and removes) one empty probe
    file where the output's temporary siblings will go -- asking the OS is the only test that also holds for
    root, ACLs and read-only mounts. Creates nothing else."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise SepoError(f"{out} already exists and is not a folder; choose another output folder")
    places = [_nearest_existing(out.parent)] + ([out] if out.is_dir() else [])
    for place in places:
        if not place.is_dir():
            raise SepoError(f"cannot write {out}: {place} is a file, not a folder; choose another output folder")
        try:
            fd, probe = tempfile.mkstemp(prefix=".sepo-write-check-", dir=place)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            if e.errno in _NO_SPACE_ERRNOS:
                raise SepoError(f"no space left on device while writing {out}; free space or choose another "
                                "output") from None
            why = {errno.EROFS: f"{place} is on a read-only filesystem", errno.EACCES: f"no permission to write in "
                   f"{place}", errno.EPERM: f"no permission to write in {place}"}.get(e.errno, f"{place}: {e.strerror}")
            raise SepoError(f"cannot write {out}: {why}; choose another output folder") from None


# ---------------------------------------------------------------------------------------------- one run per output

_HELD: dict[str, list] = {}  # lock file -> [open fd, depth]: a run that calls another stage re-enters its own lock


def lock_path(output: str | os.PathLike) -> Path:
    """The lock of an output folder: a hidden file beside it (the folder itself is replaced by a rename)."""
    out = Path(os.path.abspath(output))
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "another sepo run"
    started = f", started {info['started']}" if info.get("started") else ""
    return f"another sepo run (pid {info.get('pid')} on {info.get('host')}{started}: `{info.get('command')}`)"


def _is_main_rank() -> bool:
    """Under torchrun / accelerate every rank runs the stage; only the first one owns the output."""
    return os.environ.get("RANK", "0") in ("0", "")


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, *, stage: str = "") -> Iterator[None]:
    """Hold the lock of ``output`` for the duration of the block, or refuse at once when another process holds
    it, naming that run (pid, host, command, start time).

    The lock is an OS file lock (``flock``) on ``.<name>.lock`` beside the folder, and the file records who
    holds it. The OS releases it when its process ends in any way (even SIGKILL), so the lock of a dead run is
    simply taken over -- there is no stale-lock timeout to wait for. The file is removed on release, and the
    parent folders this created are removed again if still empty. Re-entrant within one process."""
    path = lock_path(output)
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per output is then the user's to ensure
        yield
        return
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_empty(created)
            out = Path(output)
            raise SepoError(f"{out} is being written by {_describe_holder(path)}; wait for it to finish, or choose "
                            "another output") from None
        # the holder before us may have removed the file between our open and our flock: lock the file that is there
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "command": _command_line(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):  # who holds it is for the message only: a full disk must not stop the run
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        _remove_empty(created)


def _command_line() -> str:
    argv = list(sys.argv) or [""]
    if argv[0].endswith(("/sepo", "sepo/__main__.py")) or argv[0] == "sepo":
        return shlex.join(["sepo", *argv[1:]])
    return shlex.join(["python", *argv])


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()


def owns_output(output_of: Callable[[Any], Any] = lambda cfg: cfg.output):
    """Decorate a stage's ``run(cfg)``: the folder ``output_of(cfg)`` is checked writable, then locked, for the
    whole run; a full / read-only / forbidden filesystem met while writing becomes one SepoError naming it."""

    def decorate(run):
        @functools.wraps(run)
        def run_owning_output(cfg, *args, **kwargs):
            output = output_of(cfg)
            if output is None:  # the stage refuses the config itself, with its own message
                return run(cfg, *args, **kwargs)
            check_writable(output)
            lock = output_lock(output, stage=run.__module__) if _is_main_rank() else contextlib.nullcontext()
            with lock:
                try:
                    return run(cfg, *args, **kwargs)
                except SepoError:
                    raise
                except Exception as e:
                    fault = storage_error(e, output)
                    if fault is None:
                        raise
                    raise fault from e

        return run_owning_output

    return decorate


# ---------------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on any exception it is removed (a
    full or read-only filesystem is then reported as one SepoError naming ``path``)."""
    final = Path(path)
    if final.exists() and not overwrite:
        raise SepoError(f"{final} already exists; choose another output folder or pass overwrite=true")
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise (storage_error(e, final) or e) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fault = storage_error(e, final) if isinstance(e, Exception) and not isinstance(e, SepoError) else None
        if fault is not None:
            raise fault from e
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the caller's atomic_dir / owns_output names the fault
        raise


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


PROGRESS_MIN_ROWS = 5000  # datasets' own progress bars only for operations long enough to be worth watching


@contextlib.contextmanager
def datasets_progress(show: bool) -> Iterator[None]:
    """datasets' progress bars on or off for a block (their switch is global, so it is restored after)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def save_dataset(dataset, folder: str | os.PathLike, metadata: dict, *, overwrite: bool = False) -> Path:
    """Save a `datasets.Dataset` plus its metadata JSON atomically."""
    with atomic_dir(folder, overwrite=overwrite) as tmp, datasets_progress(len(dataset) > PROGRESS_MIN_ROWS):
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
    if dataset._indices is not None:
        with datasets_progress(False):
            dataset = dataset.flatten_indices()
    return dataset.data.table


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
