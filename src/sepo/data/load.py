"""Loading preference data: a source -> canonical pairs (``load_preference_data``) -> tokenized pairs
(``load_pairs``, the entry point of every stage that reads ``data``)."""

from __future__ import annotations

import itertools
import logging
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sepo.data.columns import REWARD_COLUMNS, TOKEN_ALIGNED_COLUMNS, TOKEN_COLUMNS
from sepo.data.formats import (
    CONSUMED,
    NORMALISERS,
    REPAIRS,
    RowProblem,
    Tie,
    check_column_mapping,
    detect_format,
    rename_columns,
)
from sepo.data.options import DataOptions
from sepo.data.sources import FIRST_ROWS_KEPT, INVALID_HINT, Location, read_source
from sepo.data.tokenize import tokenize_pairs
from sepo.errors import DataError, SepoError
from sepo.io import arrow_table

log = logging.getLogger(__name__)
PEEK_ROWS = 1000  # rows read ahead of the stream to detect the format and the columns
WRITE_ROWS = 1000  # canonical rows per Arrow record batch written: what is held in memory at once

# columns every canonical row has; a source column with one of these names (or a token-id column, which is
# recomputed, or a per-token column of a sepo folder, which would not line up with the new ids) is not carried
# over as metadata -- except a source ``index``, kept as ``source_index``
_RESERVED = {"index", "prompt", "prompt_messages", "chosen", "rejected", "source_file", "source_row", *TOKEN_COLUMNS,
             *TOKEN_ALIGNED_COLUMNS}


@dataclass
class RawPairs:
    """Canonical text pairs read from a source (see ``sepo.data.formats``)."""

    dataset: object  # datasets.Dataset: index, prompt, prompt_messages, chosen, rejected + metadata columns
    format: str
    source: str
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows not kept (ties and skipped rows)
    notes: list[str] = field(default_factory=list)
    invalid_rows: dict[str, list[str]] = field(default_factory=dict)  # reason -> where its first rows are


def load_preference_data(source: str, options: DataOptions) -> RawPairs:
    """Read ``source`` (file, folder or hub id), detect or apply ``options.format`` and normalise every row.
    An unusable row raises DataError (file, row, field, hint), or is dropped and counted when
    ``options.on_invalid == "skip"``.

    The source is streamed: rows are normalised one at a time and written in batches of ``WRITE_ROWS`` to an
    Arrow file in datasets' temporary cache folder (removed when the process ends), which the returned dataset
    memory-maps. Memory is bounded by a batch, not by the size of the source."""
    skip = options.on_invalid == "skip"
    rows = read_source(source, split=options.split, subset_name=options.subset_name, skip_invalid=skip)
    head = list(itertools.islice(rows.records, PEEK_ROWS))  # the format and the columns are read off these
    if not head:
        raise DataError("has no rows" + (f" that could be read ({dict(rows.skipped)})" if rows.skipped else ""),
                        file=rows.label)
    columns = list(dict.fromkeys(key for row, _ in head for key in row))
    stream = itertools.chain(head, rows.records)
    if options.columns:
        check_column_mapping(options.columns, label=rows.label, columns=columns)
        stream = ((rename_columns(row, options.columns), where) for row, where in stream)
        head = [next(stream) for _ in range(len(head))]
        columns = list(dict.fromkeys(key for row, _ in head for key in row))
        stream = itertools.chain(head, stream)
    fmt = options.format if options.format != "auto" else detect_format(columns, [r for r, _ in head],
                                                                       label=rows.label)
    normalise, consumed = NORMALISERS[fmt], CONSUMED[fmt]

    dropped: Counter = Counter()
    dropped_at: dict[str, list[str]] = {}
    repairs: Counter = Counter()
    spool = ArrowSpool()
    for ordinal, (row, where) in enumerate(stream):
        try:
            pair = normalise(row)
        except Tie:
            dropped["tie"] += 1
            continue
        except RowProblem as problem:
            file = where.file if not rows.multi_file else str(Path(rows.label) / where.file)
            if skip:
                dropped[problem.reason] += 1
                _remember(dropped_at, problem.reason, _where(where, rows.multi_file))
                continue
            raise DataError(problem.message, file=file, row=where.row, field=problem.field,
                            hint=problem.hint or INVALID_HINT) from None
        repairs.update(pair.pop(REPAIRS, ()))
        # index: the 0-based row of a single file (row N of an error message is index N-1); for a folder of
        # files, the position in the concatenation, with the file and row kept beside it
        record = {"index": ordinal if rows.multi_file else where.row - 1, **pair}
        if rows.multi_file:
            record.update(source_file=where.file, source_row=where.row)
        for key, value in row.items():
            if key == "index":
                record["source_index"] = value
            elif key not in consumed and key not in _RESERVED:
                record[key] = value
        spool.add(record)
    dropped.update(rows.skipped)  # the source's own skips are known once the stream is exhausted
    for reason, places in rows.skipped_at.items():
        for place in places:
            _remember(dropped_at, reason, _where(place, rows.multi_file))

    notes = []
    if dropped.get("tie"):
        notes.append(f"{dropped['tie']} pair(s) judged a tie (no preferred response) were dropped")
    if repairs["empty_output_kept"]:
        notes.append(f"{repairs['empty_output_kept']} empty judged output(s) kept (their response is EOS alone)")
    if repairs["scalar_output_as_text"]:
        notes.append(f"{repairs['scalar_output_as_text']} non-string judged output(s) (e.g. JSON true) read as text")
    invalid = {r: c for r, c in dropped.items() if r != "tie"}
    if invalid:
        notes.append(f"skipped {sum(invalid.values())} invalid row(s): "
                     + ", ".join(f"{r} {c}" for r, c in sorted(invalid.items())))
    if not spool.rows:
        raise DataError(f"no usable rows (dropped: {dict(dropped)})", file=rows.label)
    dataset, unstorable = spool.finish()
    if unstorable:
        notes.append(f"metadata columns dropped: {', '.join(unstorable)} (their values change type from row to row)")
    return RawPairs(dataset=dataset, format=fmt, source=rows.label, dropped=dict(sorted(dropped.items())),
                    notes=notes, invalid_rows={r: dropped_at[r] for r in sorted(dropped_at)})


def _where(place: Location, multi_file: bool) -> str:
    """How a skipped row is shown: its row number, with the file inside the folder for a folder of files."""
    return f"{place.file} row {place.row}" if multi_file else str(place.row)


def _remember(first: dict[str, list[str]], reason: str, where: str) -> None:
    places = first.setdefault(reason, [])
    if len(places) < FIRST_ROWS_KEPT:
        places.append(where)


class ArrowSpool:
    """Canonical records -> Arrow record batches in temporary files -> one memory-mapped ``datasets.Dataset``.

    Each batch's column types are inferred from its values. A metadata column whose values change type (1 in one
    row, "one" in another) cannot be one Arrow column and is dropped (and named); one that is null in a batch, or
    absent from it, takes the type the other batches give it."""

    def __init__(self):
        from datasets.fingerprint import get_temporary_cache_files_directory

        self.folder = Path(get_temporary_cache_files_directory())
        self.stem = f"pairs-{uuid.uuid4().hex[:12]}"
        self.pending: list[dict] = []
        self.parts: list[Path] = []  # one Arrow stream per run of batches with the same schema
        self.writer = self.schema = None
        self.rows = 0
        self.unstorable: set[str] = set()

    def add(self, record: dict) -> None:
        self.pending.append(record)
        self.rows += 1
        if len(self.pending) >= WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.pending:
            return
        names = list(dict.fromkeys(key for record in self.pending for key in record))
        arrays = {}
        for name in names:
            if name in self.unstorable:
                continue
            try:
                arrays[name] = pa.array([record.get(name) for record in self.pending])
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                if name in _RESERVED:
                    raise
                self.unstorable.add(name)
        self.pending = []
        table = pa.table(arrays)
        if self.writer is None or table.schema != self.schema:
            self._close()
            self.parts.append(self.folder / f"{self.stem}-{len(self.parts)}.arrow")
            self.writer, self.schema = pa.ipc.new_stream(str(self.parts[-1]), table.schema), table.schema
        self.writer.write_table(table)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> tuple[object, list[str]]:
        """-> (the dataset, the metadata columns dropped)."""
        import datasets
        import pyarrow as pa

        self._flush()
        self._close()
        schemas = [pa.ipc.open_stream(pa.memory_map(str(p))).schema for p in self.parts]
        fields: dict[str, pa.DataType] = {}
        for schema in schemas:
            for f in schema:
                if f.name in self.unstorable:
                    continue
                if f.name not in fields or pa.types.is_null(fields[f.name]):
                    fields[f.name] = f.type
                elif f.type != fields[f.name] and not pa.types.is_null(f.type):
                    try:
                        fields[f.name] = pa.unify_schemas([pa.schema([(f.name, fields[f.name])]), pa.schema([f])],
                                                          promote_options="permissive").field(0).type
                    except (pa.ArrowException, TypeError):
                        self.unstorable.add(f.name)
        target = pa.schema([(n, t) for n, t in fields.items() if n not in self.unstorable])
        if len(self.parts) == 1 and schemas[0] == target:
            path = self.parts[0]
        else:  # rewrite the parts as one file with one schema, a batch at a time
            path = self.folder / f"{self.stem}.arrow"
            with pa.ipc.new_stream(str(path), target) as writer:
                for part in self.parts:
                    for batch in pa.ipc.open_stream(pa.memory_map(str(part))):
                        writer.write_batch(pa.record_batch(
                            [batch.column(f.name).cast(f.type) if f.name in batch.schema.names
                             else pa.nulls(batch.num_rows, f.type) for f in target], schema=target))
            for part in self.parts:
                part.unlink(missing_ok=True)
        return datasets.Dataset.from_file(str(path)), sorted(self.unstorable)


def pairs_metadata(raw: RawPairs, tokenized, tokenizer, options: DataOptions) -> dict:
    """What a tokenized dataset was made from, as stored in ``sepo_metadata.json``."""
    from sepo.models import tokenizer_fingerprint

    stats = tokenized.stats
    dropped = Counter(raw.dropped)
    dropped.update(stats["dropped"])
    applied = tokenized.options or options
    return {
        "source": raw.source,
        "format": raw.format,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "chat_template": tokenized.chat_template,
        "counts": {
            "rows_read": len(raw.dataset) + sum(raw.dropped.values()),
            "rows": stats["rows"],
            "dropped": dict(sorted(dropped.items())),
            "prompt_truncated": stats["prompt_truncated"],
            "chosen_truncated": stats["chosen_truncated"],
            "rejected_truncated": stats["rejected_truncated"],
            "boundary_retokenized": stats["boundary_retokenized"],
        },
        "invalid_rows": {reason: (raw.invalid_rows.get(reason, []) + stats.get("invalid_rows", {}).get(reason, []))
                         [:FIRST_ROWS_KEPT] for reason in sorted({*raw.invalid_rows, *stats.get("invalid_rows", {})})},
        "notes": raw.notes,
        "data_options": asdict(applied),
        "num_rows": stats["rows"],
    }


def load_pairs(data: str, tokenizer, options: DataOptions, *, context: int | None = None,
               whose: str = "the model"):
    """Tokenized pairs for a stage -> ``(datasets.Dataset, metadata)``.

    ``data`` is a sepo dataset folder (written by ``sepo data prepare``, or by a later stage, whose extra
    columns are kept), used as it is after checking it was tokenized with ``tokenizer``; or any raw source,
    read and tokenized now, with ``max_length`` following ``context`` -- the positions of the model(s) the pairs
    are for, see ``sepo.models.shortest_context`` -- when it is unset and that is shorter than the default.
    Rows dropped (ties, and invalid rows with ``on_invalid=skip``) are reported in one line.
    """
    from sepo.io import METADATA_FILE, load_dataset_dir
    from sepo.models import tokenizer_fingerprint

    if (Path(data) / METADATA_FILE).is_file():
        dataset, metadata = load_dataset_dir(data, TOKEN_COLUMNS, produced_by="sepo data prepare")
        stored, current = metadata.get("tokenizer_fingerprint"), tokenizer_fingerprint(tokenizer)
        if stored is None:
            log.warning("%s records no tokenizer_fingerprint: cannot check its token ids match this tokenizer", data)
        elif stored != current:
            made_with = metadata.get("tokenizer") or "an unrecorded tokenizer"
            name = getattr(tokenizer, "name_or_path", "TOKENIZER")
            if REWARD_COLUMNS[0] in dataset.column_names:
                # re-preparing would drop the token rewards; projecting them keeps them
                fix = f"carry the rewards over: sepo select --scores {data} --policy-tokenizer {name} --output NEW_DIR"
            else:
                fix = (f"re-prepare it: sepo data prepare {metadata.get('source') or 'SOURCE'} --tokenizer {name} "
                       "--output NEW_DIR")
            raise SepoError(
                f"{data} was tokenized with {made_with} (fingerprint {stored}), not with this tokenizer "
                f"({name}, fingerprint {current}); its token ids would mean other tokens. To use it, {fix}")
        return dataset, metadata
    raw = load_preference_data(data, options)
    tokenized = tokenize_pairs(raw.dataset, tokenizer, options, source=raw.source, context=context, whose=whose)
    metadata = pairs_metadata(raw, tokenized, tokenizer, options)
    if metadata["counts"]["dropped"]:
        log.warning("%s: %d of %d rows dropped (%s)", raw.source, sum(metadata["counts"]["dropped"].values()),
                    metadata["counts"]["rows_read"], dropped_summary(metadata["counts"]["dropped"]))
    return tokenized.dataset, metadata


def dropped_summary(dropped: dict[str, int]) -> str:
    """``tie 3, empty_response 4`` -- the one wording of dropped-row counts."""
    return ", ".join(f"{reason} {count}" for reason, count in dropped.items()) or "none"


def recorded_name(name_or_path: str) -> str:
    """How a model or tokenizer is written into metadata: a local folder as an absolute path, so a later stage
    (``sepo select``, ``sepo inspect``) run from another working directory can still load it; a hub id or the
    ``stories260k`` alias as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def check_context_length(pairs, limit: int | None, role: str, name: str) -> None:
    """Refuse sequences longer than the model's positions: a learned position table fails with an index error
    deep in the forward, and a rotary model returns log-probs from positions it was never trained on.
    ``limit``: the model's positions (``sepo.models.context_limit``); None: not known, nothing checked."""
    import numpy as np
    import pyarrow.compute as pc

    if not limit or len(pairs) == 0:
        return
    table = arrow_table(pairs)
    prompt, chosen, rejected = (pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False)
                                for c in TOKEN_COLUMNS)
    lengths = prompt + np.maximum(chosen, rejected)  # (rows,): the longer of the pair's two sequences
    over = np.flatnonzero(lengths > limit)
    if over.size:
        raise SepoError(f"{over.size} pair(s) are longer than the {role} {name} can take ({limit} positions; the "
                        f"longest is {int(lengths.max())} tokens, dataset row {int(over[0]) + 1} is the first). "
                        f"Prepare the data again with --max-length {limit} (or lower), or pass --max-length {limit} "
                        "when --data is a raw source")


def vocabulary_size(config) -> int | None:
    """Rows of the model's input embedding, from its config (a multimodal config keeps it in its text config)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)


def check_token_ids(pairs, vocab: int | None, role: str, name: str, *, pad_token_id: int | None = None) -> None:
    """Refuse token ids the model has no embedding for -- data tokenized with another tokenizer, or a pad token
    added to the tokenizer without resizing the model -- which would otherwise fail as an index error deep in
    the forward (or a device-side assert on a GPU). ``vocab``: ``vocabulary_size``; None: nothing checked."""
    import torch

    from sepo.io import flat_column

    if not vocab:
        return
    if pad_token_id is not None and pad_token_id >= vocab:
        raise SepoError(f"the tokenizer's pad token id {pad_token_id} is outside the {role} {name}'s vocabulary "
                        f"({vocab} tokens): set a pad token the model has (e.g. the eos token) or resize the model's "
                        "embeddings to the tokenizer")
    if len(pairs) == 0:
        return
    table = arrow_table(pairs)
    for column in TOKEN_COLUMNS:
        ids, lengths = flat_column(table, column)  # (total,), (rows,)
        outside = (ids >= vocab).nonzero()
        if len(outside):
            row = int(torch.searchsorted(lengths.cumsum(0), outside[0, 0], right=True))
            raise SepoError(f"token id {int(ids.max())} in {column} (dataset row {row + 1} is the first) is outside "
                            f"the {role} {name}'s vocabulary ({vocab} tokens): the data was tokenized with another "
                            "tokenizer. Prepare it again with this model's tokenizer")


def check_fits_model(pairs, config, role: str, name: str, *, pad_token_id: int | None = None) -> None:
    """Every check of pairs against a model they are about to run through: positions and vocabulary."""
    from sepo.models import context_limit

    check_context_length(pairs, context_limit(config), role, name)
    check_token_ids(pairs, vocabulary_size(config), role, name, pad_token_id=pad_token_id)
