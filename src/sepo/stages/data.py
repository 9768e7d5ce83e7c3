"""`sepo data inspect` and `sepo data prepare`: look at a preference dataset, and write it tokenized.

    sepo data inspect data/hh-rlhf/harmless-base/test.jsonl.gz --tokenizer gpt2
    sepo data prepare data/llmbar --tokenizer stories260k --max-length 512 --on-invalid skip --output runs/pairs

``prepare`` writes the canonical tokenized pairs (``index``, ``prompt``, ``prompt_messages``, ``chosen``,
``rejected``, ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` + source metadata columns) as an
Arrow dataset with ``sepo_metadata.json``, under a temporary name renamed at the end. See docs/data.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sepo import __version__
from sepo.config import option, to_dict
from sepo.data import DataOptions, load_preference_data, pairs_metadata, tokenize_pairs
from sepo.data.formats import REASONS
from sepo.data.load import dropped_summary, recorded_name
from sepo.errors import ConfigError, SepoError
from sepo.io import arrow_table, owns_output, save_dataset

BOUNDARY = "⟦|⟧"
PERCENTILES = (50, 90, 99)
# characters shown of an example: the end of the prompt (nearest the boundary) and the start of the response
SHOWN_PROMPT_CHARS, SHOWN_RESPONSE_CHARS = 600, 400


@dataclass
class DataInspectConfig:
    """Detect a preference dataset's format; counts, token lengths, examples with the boundary marked."""

    path: str = option(help="data: a file (.jsonl, .jsonl.gz, .json, .parquet, .csv), a folder or a hub id",
                       positional=True)
    tokenizer: str | None = option(None, "tokenizer (hub id, folder or stories260k); none: text statistics only")
    examples: int = option(2, "rendered examples shown", unit="rows")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading and tokenizing the data")

    def __post_init__(self):
        if self.examples < 0:
            raise ConfigError(f"examples must be >= 0, got {self.examples}")


@dataclass
class DataPrepareConfig:
    """Write the canonical tokenized pairs (Arrow) with their metadata, for every later stage."""

    path: str = option(help="data: a file (.jsonl, .jsonl.gz, .json, .parquet, .csv), a folder or a hub id",
                       positional=True)
    tokenizer: str | None = option(None, "tokenizer the pairs are tokenized with (hub id, folder or stories260k); "
                                   "required")
    output: str | None = option(None, "output folder (written atomically); required")
    overwrite: bool = option(False, "replace an existing output folder")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading and tokenizing the data")

    def __post_init__(self):
        if not self.tokenizer:
            raise ConfigError("sepo data prepare needs --tokenizer (a hub id, a tokenizer folder or stories260k)")
        if not self.output:
            raise ConfigError("sepo data prepare needs --output DIR")


# ---------------------------------------------------------------------------------------------- report helpers


def length_summary(lengths) -> dict[str, int]:
    """p50 / p90 / p99 / max of lengths (nearest-rank, so every value is a real length)."""
    values = np.asarray(lengths)
    if not values.size:
        return {f"p{p}": 0 for p in PERCENTILES} | {"max": 0}
    out = {f"p{p}": int(np.percentile(values, p, method="inverted_cdf")) for p in PERCENTILES}
    return out | {"max": int(values.max())}


def column_lengths(dataset, column: str):
    """Lengths of a text (characters) or list (items) column, read from Arrow without Python lists."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = arrow_table(dataset).column(column)
    lengths = pc.utf8_length(values) if pa.types.is_string(values.type) else pc.list_value_length(values)
    return lengths.to_numpy(zero_copy_only=False)


def _length_table(title: str, summaries: dict[str, dict[str, int]]) -> str:
    header = f"{title:<20}" + "".join(f"{k:>8}" for k in [*(f"p{p}" for p in PERCENTILES), "max"])
    rows = [f"  {name:<18}" + "".join(f"{v:>8}" for v in s.values()) for name, s in summaries.items()]
    return "\n".join([header, *rows])


def _clip(text: str, limit: int, *, keep_end: bool) -> str:
    if len(text) <= limit:
        return text
    return "…" + text[-limit:] if keep_end else text[:limit] + "…"


def _decoded_pair(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> tuple[str, str]:
    """Prompt and response text as the model sees them. The response is read off the decoded whole sequence
    (a SentencePiece response decoded alone loses its leading space); slicing decoded text is display only."""
    prompt = tokenizer.decode(prompt_ids)
    whole = tokenizer.decode(prompt_ids + response_ids)
    return prompt, whole[len(prompt):] if whole.startswith(prompt) else tokenizer.decode(response_ids)


def _example(row: dict, tokenizer) -> str:
    lines = [f"--- source row {row['index'] + 1} ---"]
    for side in ("chosen", "rejected"):
        if tokenizer is None:
            prompt, response = row["prompt"], row[side]
            label = f"prompt {BOUNDARY} {side}"
        else:
            prompt, response = _decoded_pair(tokenizer, row["prompt_input_ids"], row[f"{side}_input_ids"])
            label = f"prompt ({len(row['prompt_input_ids'])} tokens) {BOUNDARY} {side} " \
                    f"({len(row[f'{side}_input_ids'])} tokens)"
        lines += [f"[{label}]", _clip(prompt, SHOWN_PROMPT_CHARS, keep_end=True) + BOUNDARY
                  + _clip(response, SHOWN_RESPONSE_CHARS, keep_end=False)]
    return "\n".join(lines)


def invalid_rows_lines(counts: dict[str, int], first_rows: dict[str, list[str]], on_invalid: str) -> list[str]:
    """What `sepo data inspect` says about invalid rows: count and first rows per reason, and what the other
    commands will do with them."""
    invalid = {r: c for r, c in counts.items() if r != "tie"}
    if not invalid:
        return []
    lines = [f"invalid rows: {sum(invalid.values())}"]
    for reason, count in sorted(invalid.items()):
        rows = first_rows.get(reason, [])
        more = ", ..." if count > len(rows) else ""
        lines.append(f"  {reason} {count} ({REASONS.get(reason, reason)}): "
                     f"row{'s' if len(rows) > 1 else ''} {', '.join(rows)}{more}")
    if on_invalid == "error":
        lines.append("  `sepo data prepare`, `score` and `train` stop at the first of them; pass --on-invalid skip "
                     "to drop and count them")
    return lines


# ---------------------------------------------------------------------------------------------- commands


def inspect(cfg: DataInspectConfig) -> dict:
    """Print (and return) what the data layer makes of ``cfg.path``."""
    # inspecting is how invalid rows are found: they are counted and their first rows listed, never an error
    options = dataclasses.replace(cfg.data_options, on_invalid="skip")

    # ------------------------------------------------------------------ read and normalise
    raw = load_preference_data(cfg.path, options)
    report: dict = {"source": raw.source, "format": raw.format, "rows_read": len(raw.dataset) + sum(raw.dropped.values()),
                    "rows": len(raw.dataset), "dropped": dict(raw.dropped), "invalid_rows": dict(raw.invalid_rows),
                    "notes": [n for n in raw.notes if not n.startswith("skipped ")]}
    dataset, tokenizer = raw.dataset, None

    # ------------------------------------------------------------------ tokenize (optional)
    if cfg.tokenizer:
        from sepo.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
        tokenized = tokenize_pairs(raw.dataset, tokenizer, options, source=raw.source)
        dataset, options = tokenized.dataset, tokenized.options
        meta = pairs_metadata(raw, tokenized, tokenizer, options)
        report.update(rows=len(dataset), dropped=meta["counts"]["dropped"], invalid_rows=meta["invalid_rows"],
                      tokenizer=cfg.tokenizer, chat_template=tokenized.chat_template,
                      truncated={k: meta["counts"][k] for k in ("prompt_truncated", "chosen_truncated",
                                                                 "rejected_truncated")},
                      boundary_retokenized=meta["counts"]["boundary_retokenized"],
                      token_lengths={c: length_summary(column_lengths(dataset, f"{c}_input_ids"))
                                     for c in ("prompt", "chosen", "rejected")})
    report["char_lengths"] = {c: length_summary(column_lengths(dataset, c)) for c in ("prompt", "chosen", "rejected")}

    # ------------------------------------------------------------------ print
    out = [f"source: {raw.source}", f"format: {raw.format}",
           f"rows: {report['rows_read']} read, {report['rows']} kept; dropped: {dropped_summary(report['dropped'])}"]
    out += invalid_rows_lines(report["dropped"], report["invalid_rows"], cfg.data_options.on_invalid)
    out += [f"note: {n}" for n in report["notes"]]
    if tokenizer is not None:
        t = report["truncated"]
        out += [f"tokenizer: {cfg.tokenizer} (chat template: {report['chat_template']}; max_length "
                f"{options.max_length}, max_prompt_length {options.max_prompt_length})",
                f"truncated: {t['prompt_truncated']} prompts (from the left), {t['chosen_truncated']} chosen and "
                f"{t['rejected_truncated']} rejected responses (from the right); boundary re-tokenized: "
                f"{report['boundary_retokenized']}",
                _length_table("tokens (truncated)", report["token_lengths"])]
    out.append(_length_table("characters", report["char_lengths"]))
    shown = dataset.select(range(min(cfg.examples, len(dataset))))
    if len(shown):
        out.append(f"\n{BOUNDARY} marks where the prompt ends and the response begins"
                   + (" (decoded token ids, special tokens shown)" if tokenizer is not None else ""))
        out += [_example(row, tokenizer) for row in shown]
    print("\n".join(out))
    return report


@owns_output()
def prepare(cfg: DataPrepareConfig) -> Path:
    """Tokenize ``cfg.path`` with ``cfg.tokenizer`` and write it to ``cfg.output``; returns the folder."""
    from sepo.models import load_tokenizer

    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:  # before any work, not only at the final rename
        raise SepoError(f"{output} already exists; choose another --output or pass --overwrite")

    # ------------------------------------------------------------------ read, normalise, tokenize (streamed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    raw = load_preference_data(cfg.path, cfg.data_options)
    tokenized = tokenize_pairs(raw.dataset, tokenizer, cfg.data_options, source=raw.source)

    # ------------------------------------------------------------------ write (temporary folder, then rename)
    metadata = {"stage": "data prepare", "sepo_version": __version__, **pairs_metadata(raw, tokenized, tokenizer,
                cfg.data_options), "tokenizer": recorded_name(cfg.tokenizer), "config": to_dict(cfg)}
    save_dataset(tokenized.dataset, output, metadata, overwrite=cfg.overwrite)

    counts = metadata["counts"]
    print(f"format: {raw.format}; rows: {counts['rows_read']} read, {counts['rows']} written; dropped: "
          f"{dropped_summary(counts['dropped'])}")
    print(f"truncated: {counts['prompt_truncated']} prompts, {counts['chosen_truncated']} chosen, "
          f"{counts['rejected_truncated']} rejected (max_length {tokenized.options.max_length}); chat template: "
          f"{tokenized.chat_template}")
    for note in raw.notes:
        if not note.startswith("skipped "):  # the dropped counts above already say it
            print(f"note: {note}")
    print(f"wrote {output}")
    return output
