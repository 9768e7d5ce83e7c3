"""Reading a preference data source into plain records, with the file and row of each one.

A source is a local file (.jsonl, .jsonl.gz, .json, .json.gz, .parquet, .csv), a local folder (a ``datasets``
``save_to_disk`` folder, or a folder of such files, e.g. LLMBar's ``*/dataset.json``) or a hub dataset id.

JSON is parsed here line by line with the standard library rather than by ``datasets``' JSON builder, so that
a malformed line or a bad UTF-8 byte can be reported as "file, row N" -- or skipped and counted with
``on_invalid="skip"`` -- instead of surfacing as an Arrow traceback.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sepo.errors import DataError, SepoError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
INVALID_HINT = "fix or remove the row, or pass --on-invalid skip to drop unusable rows and count them"


@dataclass
class Location:
    """Where a record came from: a file (or hub id) and its 1-based row (a line number for JSON lines)."""

    file: str
    row: int


@dataclass
class SourceTable:
    """The records of a source in order, each with its location; unreadable rows skipped by reason."""

    label: str
    rows: list[dict] = field(default_factory=list)
    locations: list[Location] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    multi_file: bool = False

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows[:1000]:
            seen.update(dict.fromkeys(row))
        return list(seen)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def looks_like_path(source: str) -> bool:
    """A source written as a path (a data-file suffix, or starting with ./, ../, / or ~) is never a hub id."""
    return bool(_suffix(Path(source))) or source.startswith((".", "/", "~")) or "\\" in source


def read_source(source: str, *, split: str = "train", subset_name: str | None = None,
                skip_invalid: bool = False) -> SourceTable:
    """Every record of ``source`` as a dict. Unreadable rows raise DataError, or are counted when skipping."""
    path = Path(source).expanduser()
    if path.is_file():
        table = SourceTable(label=str(path))
        _read_file(path, table, skip_invalid)
        return table
    if path.is_dir():
        return _read_folder(path, split, skip_invalid)
    if path.exists():
        raise SepoError(f"{source} is neither a regular file nor a folder")
    if looks_like_path(source):
        raise SepoError(f"{source} does not exist (no such file or folder)")
    return _read_hub(source, split, subset_name)


# ---------------------------------------------------------------------------------------------- files


def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"not a readable gzip file ({e})", file=str(path),
                            hint="check the download; decompress it or rename it without .gz") from None
    return data


def _bad_utf8(err: UnicodeDecodeError) -> str:
    return (f"not valid UTF-8 (byte 0x{err.object[err.start]:02x} at byte {err.start + 1} of the row); the file "
            "must be UTF-8 encoded")


UTF8_HINT = "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or pass --on-invalid skip"


def _read_file(path: Path, table: SourceTable, skip_invalid: bool, *, name: str | None = None) -> None:
    suffix = _suffix(path)
    label = name or str(path)
    if suffix == ".parquet":
        _read_parquet(path, table, label)
    elif suffix == ".csv":
        _read_csv(path, table, label)
    elif suffix in (".jsonl", ".jsonl.gz"):
        _read_json_lines(_open_bytes(path), table, label, skip_invalid)
    elif suffix in (".json", ".json.gz"):
        _read_json(_open_bytes(path), table, label, skip_invalid)
    else:
        raise SepoError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)} or a datasets folder")


def _add_record(table: SourceTable, record, label: str, number: int, skip_invalid: bool) -> None:
    """Append one parsed JSON value as a row; anything but an object is an invalid row."""
    if not isinstance(record, dict):
        if skip_invalid:
            table.skipped["not_an_object"] += 1
            return
        raise DataError(f"expected a JSON object, got {type(record).__name__}", file=label, row=number,
                        hint=INVALID_HINT)
    table.rows.append(record)
    table.locations.append(Location(label, number))


def _read_json_lines(data: bytes, table: SourceTable, label: str, skip_invalid: bool) -> None:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading byte-order mark is not data
        except UnicodeDecodeError as e:
            if skip_invalid:
                table.skipped["bad_utf8"] += 1
                continue
            raise DataError(_bad_utf8(e), file=label, row=number, hint=UTF8_HINT) from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            if skip_invalid:
                table.skipped["malformed_json"] += 1
                continue
            raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", file=label, row=number,
                            hint="each line must be one complete JSON object; " + INVALID_HINT) from None
        _add_record(table, record, label, number, skip_invalid)


def _read_json(data: bytes, table: SourceTable, label: str, skip_invalid: bool) -> None:
    """A JSON array of objects, or JSON lines saved as .json (tried when the file is not one JSON value)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if data.lstrip()[:1] == b"{":  # JSON lines: the bad row can be named and skipped
            _read_json_lines(data, table, label, skip_invalid)
            return
        line = data[: e.start].count(b"\n") + 1
        raise DataError(_bad_utf8(e).replace("of the row", "of the file"), file=label, row=line,
                        hint="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{"):
            _read_json_lines(data, table, label, skip_invalid)
            return
        raise DataError(f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})", file=label,
                        row=e.lineno, hint="the file must be a JSON array of objects, or one JSON object per line"
                        ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"expected a JSON array of objects, got {type(value).__name__}", file=label)
    for number, record in enumerate(value, start=1):
        _add_record(table, record, label, number, skip_invalid)


def _read_parquet(path: Path, table: SourceTable, label: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", file=label) from None
    table.rows += records
    table.locations += [Location(label, i) for i in range(1, len(records) + 1)]


def _read_csv(path: Path, table: SourceTable, label: str) -> None:
    """Row N is the N-th record after the header line. Every value is a string; quoted fields may span lines."""
    data = _open_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n")  # the header is line 1, so this is the data row (for one-line rows)
        raise DataError(_bad_utf8(e).replace("of the row", "of the file"), file=label, row=max(line, 1),
                        hint="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for number, record in enumerate(reader, start=1):
            record.pop(None, None)  # extra unnamed cells of an over-long row
            table.rows.append(record)
            table.locations.append(Location(label, number))
    except csv.Error as e:
        raise DataError(f"malformed CSV ({e})", file=label, row=reader.line_num) from None


# ---------------------------------------------------------------------------------------------- folders and hub


def _is_datasets_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _read_folder(path: Path, split: str, skip_invalid: bool) -> SourceTable:
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
    table = SourceTable(label=str(path), multi_file=len(files) > 1)
    for file in files:
        # rows are named by the file's path inside the folder, e.g. "Adversarial/GPTInst/dataset.json"
        _read_file(file, table, skip_invalid, name=str(file.relative_to(path)))
    return table


def _from_dataset(dataset, label: str) -> SourceTable:
    rows = dataset.to_list()
    return SourceTable(label=label, rows=rows, locations=[Location(label, i) for i in range(1, len(rows) + 1)])


def _read_hub(source: str, split: str, subset_name: str | None) -> SourceTable:
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
