"""Loading preference data: a source -> canonical pairs (``load_preference_data``) -> tokenized pairs
(``load_pairs``, the entry point of every stage that reads ``data``)."""

from __future__ import annotations

import logging
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
    apply_column_mapping,
    detect_format,
)
from sepo.data.options import DataOptions
from sepo.data.sources import INVALID_HINT, read_source
from sepo.data.tokenize import tokenize_pairs
from sepo.errors import DataError, SepoError
from sepo.io import arrow_table

log = logging.getLogger(__name__)

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


def load_preference_data(source: str, options: DataOptions) -> RawPairs:
    """Read ``source`` (file, folder or hub id), detect or apply ``options.format`` and normalise every row.
    An unusable row raises DataError (file, row, field, hint), or is dropped and counted when
    ``options.on_invalid == "skip"``."""
    import datasets

    skip = options.on_invalid == "skip"
    table = read_source(source, split=options.split, subset_name=options.subset_name, skip_invalid=skip)
    if not table.rows:
        raise DataError("has no rows" + (f" that could be read ({dict(table.skipped)})" if table.skipped else ""),
                        file=table.label)
    if options.columns:
        apply_column_mapping(table.rows, options.columns, label=table.label, columns=table.columns)
    fmt = options.format if options.format != "auto" else detect_format(table.columns, table.rows, label=table.label)
    normalise, consumed = NORMALISERS[fmt], CONSUMED[fmt]

    dropped: Counter = Counter(table.skipped)
    repairs: Counter = Counter()
    records = []
    for ordinal, (row, where) in enumerate(zip(table.rows, table.locations)):
        try:
            pair = normalise(row)
        except Tie:
            dropped["tie"] += 1
            continue
        except RowProblem as problem:
            if skip:
                dropped[problem.reason] += 1
                continue
            raise DataError(problem.message, file=where.file if not table.multi_file else
                            str(Path(table.label) / where.file), row=where.row, field=problem.field,
                            hint=problem.hint or INVALID_HINT) from None
        repairs.update(pair.pop(REPAIRS, ()))
        # index: the 0-based row of a single file (row N of an error message is index N-1); for a folder of
        # files, the position in the concatenation, with the file and row kept beside it
        record = {"index": ordinal if table.multi_file else where.row - 1, **pair}
        if table.multi_file:
            record.update(source_file=where.file, source_row=where.row)
        for key, value in row.items():
            if key == "index":
                record["source_index"] = value
            elif key not in consumed and key not in _RESERVED:
                record[key] = value
        records.append(record)

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
        log.warning("%s: %s", table.label, notes[-1])
    if not records:
        raise DataError(f"no usable rows (dropped: {dict(dropped)})", file=table.label)
    unstorable = _unstorable_columns(records)
    if unstorable:
        notes.append(f"metadata columns dropped: {', '.join(unstorable)} (their values change type from row to row)")
        records = [{k: v for k, v in r.items() if k not in unstorable} for r in records]
    dataset = datasets.Dataset.from_list(records)
    return RawPairs(dataset=dataset, format=fmt, source=table.label, dropped=dict(sorted(dropped.items())),
                    notes=notes)


def pairs_metadata(raw: RawPairs, tokenized, tokenizer, options: DataOptions) -> dict:
    """What a tokenized dataset was made from, as stored in ``sepo_metadata.json``."""
    from sepo.models import tokenizer_fingerprint

    stats = tokenized.stats
    dropped = Counter(raw.dropped)
    dropped.update(stats["dropped"])
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
        "notes": raw.notes,
        "data_options": asdict(options),
        "num_rows": stats["rows"],
    }


def load_pairs(data: str, tokenizer, options: DataOptions):
    """Tokenized pairs for a stage -> ``(datasets.Dataset, metadata)``.

    ``data`` is a sepo dataset folder (written by ``sepo data prepare``, or by a later stage, whose extra
    columns are kept), used as it is after checking it was tokenized with ``tokenizer``; or any raw source,
    read and tokenized now.
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
    tokenized = tokenize_pairs(raw.dataset, tokenizer, options, source=raw.source)
    return tokenized.dataset, pairs_metadata(raw, tokenized, tokenizer, options)


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


def _unstorable_columns(records: list[dict]) -> list[str]:
    """Metadata columns Arrow cannot store as one type (e.g. 1 in one row, "one" in another)."""
    import pyarrow as pa

    names = dict.fromkeys(k for r in records for k in r if k not in _RESERVED)
    bad = []
    for name in names:
        try:
            pa.array([r.get(name) for r in records])
        except (pa.ArrowException, TypeError, ValueError):
            bad.append(name)
    return bad
