"""Reading a preference data source as a stream of plain records, each with its file and row.

A source is a local file (.jsonl, .jsonl.gz, .json, .json.gz, .parquet, .csv), a local folder (a ``datasets``
``save_to_disk`` folder, or a folder of such files, e.g. LLMBar's ``*/dataset.json``) or a hub dataset id.

Records are yielded one at a time -- JSON lines line by line from the (gzip) stream, Parquet and Arrow in
record batches, CSV row by row -- so what is held at once is bounded by a batch, not by the file. (A ``.json``
file holding one JSON array is the exception: it is one value and is parsed whole.)

JSON is parsed here line by line with the standard library rather than by ``datasets``' JSON builder, so that
a malformed line or a bad UTF-8 byte can be reported as "file, row N" -- or skipped and counted with
``on_invalid="skip"`` -- instead of surfacing as an Arrow traceback.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sepo.errors import DataError, SepoError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
INVALID_HINT = "fix or remove the row, or pass --on-invalid skip to drop unusable rows and count them"
BATCH_ROWS = 1000  # rows read per Parquet / Arrow record batch
FIRST_ROWS_KEPT = 5  # row numbers remembered per reason for a skipped row (`sepo data inspect` shows them)


@dataclass
class Location:
    """Where a record came from: a file (or hub id) and its 1-based row (a line number for JSON lines)."""

    file: str
    row: int


@dataclass
class SourceRows:
    """The records of a source, in order, as a one-pass stream of ``(record, location)``. Unreadable rows
    skipped (``skip_invalid``) are counted by reason as the stream is read, the first rows of each remembered."""

    label: str
    records: Iterator[tuple[dict, Location]] = field(default_factory=lambda: iter(()))
    skipped: Counter = field(default_factory=Counter)
    skipped_at: dict[str, list[Location]] = field(default_factory=dict)
    multi_file: bool = False

    def skip(self, reason: str, where: Location) -> None:
        self.skipped[reason] += 1
        first = self.skipped_at.setdefault(reason, [])
        if len(first) < FIRST_ROWS_KEPT:
            first.append(where)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def looks_like_path(source: str) -> bool:
    """A source written as a path (a data-file suffix, or starting with ./, ../, / or ~) is never a hub id."""
    return bool(_suffix(Path(source))) or source.startswith((".", "/", "~")) or "\\" in source


def read_source(source: str, *, split: str = "train", subset_name: str | None = None,
                skip_invalid: bool = False) -> SourceRows:
    """Every record of ``source`` as a stream. Unreadable rows raise DataError (when the stream reaches them),
    or are counted when skipping."""
    path = Path(source).expanduser()
    if path.is_file():
        _suffix_or_refuse(path)
        rows = SourceRows(label=str(path))
        rows.records = _read_file(path, rows, skip_invalid)
        return rows
    if path.is_dir():
        return _read_folder(path, split, skip_invalid)
    if path.exists():
        raise SepoError(f"{source} is neither a regular file nor a folder")
    if looks_like_path(source):
        raise SepoError(f"{source} does not exist (no such file or folder)")
    return _read_hub(source, split, subset_name)


# ---------------------------------------------------------------------------------------------- files


def _suffix_or_refuse(path: Path) -> str:
    suffix = _suffix(path)
    if not suffix:
        raise SepoError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)} or a datasets folder")
    return suffix


def _gzip_error(label: str, err: Exception) -> DataError:
    return DataError(f"not a readable gzip file ({err})", file=label,
                     hint="check the download; decompress it or rename it without .gz")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _bad_utf8(err: UnicodeDecodeError) -> str:
    return (f"not valid UTF-8 (byte 0x{err.object[err.start]:02x} at byte {err.start + 1} of the row); the file "
            "must be UTF-8 encoded")


UTF8_HINT = "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or pass --on-invalid skip"


def _read_file(path: Path, rows: SourceRows, skip_invalid: bool, *, name: str | None = None):
    suffix = _suffix_or_refuse(path)
    label = name or str(path)
    if suffix == ".parquet":
        yield from _read_parquet(path, label)
    elif suffix == ".csv":
        yield from _read_csv(path, rows, label, skip_invalid)
    elif suffix in (".jsonl", ".jsonl.gz"):
        with _open_binary(path) as stream:
            yield from _read_json_lines(stream, rows, label, skip_invalid)
    else:
        yield from _read_json(path, rows, label, skip_invalid)


def _record(record, label: str, number: int, rows: SourceRows, skip_invalid: bool):
    """One parsed JSON value as a row (a 0- or 1-tuple); anything but an object is an invalid row."""
    if not isinstance(record, dict):
        if skip_invalid:
            rows.skip("not_an_object", Location(label, number))
            return ()
        raise DataError(f"expected a JSON object, got {type(record).__name__}", file=label, row=number,
                        hint=INVALID_HINT)
    return ((record, Location(label, number)),)


def _lines(stream, label: str):
    try:
        yield from stream
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise _gzip_error(label, e) from None


def _read_json_lines(stream, rows: SourceRows, label: str, skip_invalid: bool):
    for number, raw in enumerate(_lines(stream, label), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading byte-order mark is not data
        except UnicodeDecodeError as e:
            if skip_invalid:
                rows.skip("bad_utf8", Location(label, number))
                continue
            raise DataError(_bad_utf8(e), file=label, row=number, hint=UTF8_HINT) from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            if skip_invalid:
                rows.skip("malformed_json", Location(label, number))
                continue
            raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", file=label, row=number,
                            hint="each line must be one complete JSON object; " + INVALID_HINT) from None
        yield from _record(record, label, number, rows, skip_invalid)


def _read_json(path: Path, rows: SourceRows, label: str, skip_invalid: bool):
    """JSON lines saved as .json (streamed), or a JSON array of objects (one value: parsed whole)."""
    if _is_json_lines(path, label):
        with _open_binary(path) as stream:
            yield from _read_json_lines(stream, rows, label, skip_invalid)
        return
    with _open_binary(path) as stream:
        try:
            data = stream.read()
        except (OSError, EOFError, zlib.error) as e:
            raise _gzip_error(label, e) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(_bad_utf8(e).replace("of the row", "of the file"), file=label, row=line,
                        hint="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})", file=label,
                        row=e.lineno, hint="the file must be a JSON array of objects, or one JSON object per line"
                        ) from None
    del data, text
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"expected a JSON array of objects, got {type(value).__name__}", file=label)
    for number, record in enumerate(value, start=1):
        yield from _record(record, label, number, rows, skip_invalid)


def _is_json_lines(path: Path, label: str) -> bool:
    """A .json file is JSON lines when its first non-empty line is a whole JSON object by itself (a
    pretty-printed object or an array spans lines)."""
    with _open_binary(path) as stream:
        for raw in _lines(stream, label):
            if not raw.strip():
                continue
            try:
                return isinstance(json.loads(raw), dict)
            except UnicodeDecodeError:  # a bad byte in the first line: JSON lines if it looks like one object
                return raw.strip().startswith(b"{") and raw.strip().endswith(b"}")
            except json.JSONDecodeError:
                return False
    return False


def _read_parquet(path: Path, label: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            for record in batch.to_pylist():
                number += 1
                yield record, Location(label, number)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", file=label) from None


def _read_csv(path: Path, rows: SourceRows, label: str, skip_invalid: bool):
    """Row N is the N-th record after the header line. Every value is a string; quoted fields may span lines.
    Bytes that are not UTF-8 are kept as escapes while reading, so the row and field holding one are named."""
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
        reader = csv.DictReader(text)
        try:
            for number, record in enumerate(reader, start=1):
                record.pop(None, None)  # extra unnamed cells of an over-long row
                bad = _undecodable(record)
                if bad is not None:
                    if skip_invalid:
                        rows.skip("bad_utf8", Location(label, number))
                        continue
                    name, byte = bad
                    raise DataError(f"not valid UTF-8 (byte 0x{byte:02x}); the file must be UTF-8 encoded",
                                    file=label, row=number, field=name, hint=UTF8_HINT)
                yield record, Location(label, number)
        except csv.Error as e:
            raise DataError(f"malformed CSV ({e})", file=label, row=reader.line_num) from None


def _undecodable(record: dict) -> tuple[str, int] | None:
    """The first field holding a byte that was not UTF-8 (read with surrogateescape), and that byte."""
    for name, value in record.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return str(name), ord(value[e.start]) - 0xDC00
    return None


# ---------------------------------------------------------------------------------------------- folders and hub


def _is_datasets_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _read_folder(path: Path, split: str, skip_invalid: bool) -> SourceRows:
    if _is_datasets_folder(path):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a broken folder
            raise SepoError(f"{path} is not a readable datasets folder ({type(e).__name__}: {e})") from None
        label = str(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SepoError(f"{path} has no split '{split}'; it has {', '.join(loaded)} (pass --split NAME)")
            loaded, label = loaded[split], f"{path} [{split}]"
        return _from_dataset(loaded, label)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) and not p.name.startswith("."))
    if not files:
        raise SepoError(f"{path} is neither a datasets folder (save_to_disk) nor a folder holding data files "
                        f"({', '.join(FILE_SUFFIXES)})")
    rows = SourceRows(label=str(path), multi_file=len(files) > 1)
    # rows are named by the file's path inside the folder, e.g. "Adversarial/GPTInst/dataset.json"
    rows.records = (item for file in files
                    for item in _read_file(file, rows, skip_invalid, name=str(file.relative_to(path))))
    return rows


def _from_dataset(dataset, label: str) -> SourceRows:
    def records():
        number = 0
        for batch in dataset.iter(batch_size=BATCH_ROWS):
            for values in zip(*batch.values()):
                number += 1
                yield dict(zip(batch, values)), Location(label, number)

    return SourceRows(label=label, records=records())


def _read_hub(source: str, split: str, subset_name: str | None) -> SourceRows:
    import datasets

    from sepo.hub import hub_hint, hub_offline, probe, unreachable_error

    err = None if hub_offline() else probe(source, "dataset")
    if err is not None:  # datasets would retry for half a minute, then fail anyway
        raise unreachable_error("data", source, err)
    try:
        loaded = datasets.load_dataset(source, subset_name, split=split)
    except Exception as e:  # hub, network and builder errors come in many types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise SepoError(
            f"could not load '{source}': it is not a local file or folder, and as a hub dataset id (split "
            f"'{split}') it could not be loaded ({type(e).__name__}: {first}); {hub_hint()}, and --split and "
            "--subset-name") from None
    return _from_dataset(loaded, f"{source} [{split}]")
