"""Tokenizing canonical pairs with an exact prompt/response boundary.

For each row the prompt and each response become separate id lists (``prompt_input_ids``,
``chosen_input_ids``, ``rejected_input_ids``); the model sees ``prompt_ids + response_ids`` and every
response ends with the tokenizer's EOS. Nothing is found by slicing templated text:

1. The prompt text is rendered: the plain ``prompt`` column, or ``prompt_messages`` through a chat template
   with ``add_generation_prompt=True`` -- exactly what the model is given when it generates. (The full
   conversation is never rendered through the template: some templates render an assistant turn in history
   differently from a generated one, e.g. dropping reasoning, so its prefix need not match.)
2. ``prompt_ids = encode(prompt_text)`` and ``joint = encode(prompt_text + response)``. When ``joint`` starts with
   ``prompt_ids`` -- the usual case -- the response ids are the rest of ``joint``, so the response is
   tokenized exactly as in running text. When it does not (a BPE merge across the boundary, e.g. a prompt
   ending in a space or "\\n" and a response starting with one), the response is encoded on its own and
   appended: ``prompt_ids`` stays what generation sees, and the row is counted in ``boundary_retokenized``.
   (A SentencePiece tokenizer that adds a prefix space then starts that response with one; rare, and counted.)
3. Text is encoded without special tokens; the tokenizer's own leading specials (a BOS, found by encoding
   with and without them) are put in front unless the rendered template already starts with them, so BOS is
   never doubled. EOS is the tokenizer's ``eos_token_id``, appended unless the response already ends with it.

With a chat template the response is the assistant message's content: its leading whitespace, a plain-text
joiner such as the space in HH-RLHF's ``"Assistant: reply"``, is dropped because the template already
separates the turn.

Truncation (TRL's rule): a prompt longer than ``max_prompt_length`` -- however long, also beyond ``max_length``
-- keeps its leading specials (BOS) and its last tokens (cut from the left, so the question nearest the
answer survives); a response longer than the rest of ``max_length`` is cut from the
right and still ends with EOS, because later stages rely on every response ending with it (the EOS then marks
a cut, not an end the text had; the truncation counts make that visible).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sepo.data.columns import TOKEN_ALIGNED_COLUMNS, TOKEN_COLUMNS
from sepo.data.formats import REASONS
from sepo.data.options import DataOptions, with_lengths
from sepo.data.sources import FIRST_ROWS_KEPT, INVALID_HINT
from sepo.errors import ConfigError, DataError, SepoError

log = logging.getLogger(__name__)

_SIDES = ("chosen", "rejected")
# per-row bookkeeping columns written by the map and removed afterwards
_PROBLEM, _PROBLEM_FIELD, _PROBLEM_MESSAGE = "_problem", "_problem_field", "_problem_message"
_FLAGS = ("_prompt_truncated", "_chosen_truncated", "_rejected_truncated", "_boundary_retokenized")
MAP_BATCH_ROWS = 256  # rows per batched tokenizer call in the map (one Rust call per column per batch)


@dataclass
class TokenizedPairs:
    dataset: object  # datasets.Dataset: the canonical pairs plus TOKEN_COLUMNS
    stats: dict = field(default_factory=dict)  # rows, truncation counts, dropped by reason (+ first rows)
    chat_template: str = "none"  # "none", "tokenizer" or "custom"
    options: DataOptions | None = None  # as applied: max_length fixed (see with_lengths)


@dataclass
class PromptTemplate:
    kind: str  # "none": the plain prompt; "tokenizer": the tokenizer's template; "custom": ``text``
    text: str | None = None


def resolve_template(tokenizer, setting: str) -> PromptTemplate:
    """``auto`` / ``none`` / a Jinja string / a path to a .jinja file -> how prompts are rendered."""
    if setting == "none":
        return PromptTemplate("none")
    if setting == "auto":
        return PromptTemplate("tokenizer" if getattr(tokenizer, "chat_template", None) else "none")
    path = Path(setting).expanduser()
    if path.suffix in (".jinja", ".j2") or (path.is_file() and "{" not in setting):
        if not path.is_file():
            raise ConfigError(f"data_options.chat_template: template file {setting} does not exist")
        return PromptTemplate("custom", path.read_text(encoding="utf-8"))
    if "{{" in setting or "{%" in setting:
        return PromptTemplate("custom", setting)
    raise ConfigError(f"data_options.chat_template is {setting!r}: use auto, none, a Jinja template string or a "
                      "path to a .jinja file")


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text (usually [BOS] or nothing), read off an actual encoding."""
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return with_specials[:start]
    return []


class PairEncoder:
    """Encodes batches of canonical rows; holds the tokenizer, the rendering and the length limits."""

    def __init__(self, tokenizer, template: PromptTemplate, options: DataOptions):
        if tokenizer.eos_token_id is None:
            raise SepoError("the tokenizer has no EOS token; every response must end with one. Set "
                            "tokenizer.eos_token (or use a tokenizer that defines it)")
        self.tokenizer, self.template, self.options = tokenizer, template, options
        self.eos = tokenizer.eos_token_id
        self.leading = leading_special_ids(tokenizer)

    def render_prompt(self, row: dict) -> str:
        if self.template.kind == "none":
            return row["prompt"]
        return self.tokenizer.apply_chat_template(row["prompt_messages"], tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.template.text)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []

    def __call__(self, batch: dict) -> dict:
        n = len(batch["prompt"])
        # pairs built by hand may carry the prompt as text only: it is then a single user message
        messages = batch.get("prompt_messages") or [[{"role": "user", "content": p}] for p in batch["prompt"]]
        rows = [{"prompt": batch["prompt"][i], "prompt_messages": messages[i], "chosen": batch["chosen"][i],
                 "rejected": batch["rejected"][i]} for i in range(n)]
        out: dict[str, list] = {c: [[] for _ in range(n)] for c in TOKEN_COLUMNS}
        out.update({_PROBLEM: [""] * n, _PROBLEM_FIELD: [""] * n, _PROBLEM_MESSAGE: [""] * n})
        out.update({f: [False] * n for f in _FLAGS})

        prompts: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                prompts[i] = self.render_prompt(row)
            except Exception as e:  # jinja2.TemplateError, or a template's own raise_exception(...)
                self._problem(out, i, "template_error", "prompt_messages",
                              f"the chat template failed: {type(e).__name__}: {e}")
        live = sorted(prompts)
        responses = {side: [self._response_text(rows[i][side]) for i in live] for side in _SIDES}
        prompt_ids = self.encode([prompts[i] for i in live])
        joint = {side: self.encode([prompts[i] + r for i, r in zip(live, responses[side])]) for side in _SIDES}

        for k, i in enumerate(live):
            ids = prompt_ids[k]
            if ids[: len(self.leading)] != self.leading:
                ids = self.leading + ids
            if not ids:
                self._problem(out, i, "empty_prompt", "prompt", "the prompt has no tokens and the tokenizer adds no "
                              "BOS, so the first response token has no position to be predicted from")
                continue
            if len(ids) > self.options.max_prompt_length:
                keep = max(self.options.max_prompt_length - len(self.leading), 0)
                ids = self.leading + ids[len(ids) - keep :] if keep else list(self.leading)
                out["_prompt_truncated"][i] = True
            budget = self.options.max_length - len(ids)  # >= 1: max_prompt_length < max_length
            for side in _SIDES:
                resp = self._response_ids(prompt_ids[k], joint[side][k], responses[side][k], out, i)
                if len(resp) > budget:
                    resp = resp[: budget - 1] + [self.eos]
                    out[f"_{side}_truncated"][i] = True
                out[f"{side}_input_ids"][i] = resp
            if out["chosen_input_ids"][i] == out["rejected_input_ids"][i]:
                self._problem(out, i, "identical_responses", "rejected", "chosen and rejected have the same tokens "
                              "after tokenization and truncation")
                continue
            out["prompt_input_ids"][i] = ids
        return out

    def _response_text(self, text: str) -> str:
        return text.lstrip() if self.template.kind != "none" else text

    def _response_ids(self, prompt_ids: list[int], joint: list[int], text: str, out: dict, i: int) -> list[int]:
        if joint[: len(prompt_ids)] == prompt_ids:
            resp = joint[len(prompt_ids) :]
        else:  # the boundary merged into one token: keep the prompt as generation sees it
            resp = self.encode([text])[0]
            out["_boundary_retokenized"][i] = True
        return resp if resp and resp[-1] == self.eos else resp + [self.eos]

    @staticmethod
    def _problem(out: dict, i: int, reason: str, field_name: str, message: str) -> None:
        out[_PROBLEM][i], out[_PROBLEM_FIELD][i], out[_PROBLEM_MESSAGE][i] = reason, field_name, message
        for c in TOKEN_COLUMNS:
            out[c][i] = []


WORD_CACHE_ENTRIES = 1000  # the Rust BPE model's word cache while a dataset is tokenized (its default: 10,000)


@contextlib.contextmanager
def bounded_word_cache(tokenizer):
    """Bound the fast tokenizer's BPE word cache while a whole dataset goes through it. A SentencePiece-style
    tokenizer whose pre-tokenizer does not split on spaces (Metaspace ``split=False``, e.g. Llama's) caches
    every distinct *text* as one word: 10,000 entries held about 120 MB after a few thousand pairs. 1,000
    entries keep the common words of a word-splitting tokenizer (GPT-2) cached. Restored after."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    resize = getattr(model, "_resize_cache", None)  # tokenizers >= 0.20 (private, hence the guard)
    if resize is None:
        yield
        return
    resize(WORD_CACHE_ENTRIES)
    try:
        yield
    finally:
        resize(10_000)


def _row_location(row: dict, position: int, source: str) -> tuple[str, int]:
    """File and 1-based row of a canonical row (at ``position`` in the dataset), for error messages."""
    if row.get("source_file"):
        return str(Path(source) / row["source_file"]) if source else row["source_file"], int(row["source_row"])
    return source or "data", int(row.get("index", position)) + 1


def tokenizer_context(tokenizer) -> int | None:
    """The tokenizer's ``model_max_length`` when it is set (transformers' placeholder for "unset" is ~1e30)."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length < 10**7 else None


def tokenize_pairs(dataset, tokenizer, options: DataOptions, *, source: str = "", context: int | None = None,
                   whose: str = "the model") -> TokenizedPairs:
    """Add TOKEN_COLUMNS to canonical pairs (``load_preference_data(...).dataset``); see the module docstring.
    Invalid rows raise DataError naming ``source`` and the row, or are dropped and counted (on_invalid=skip).
    ``context``: positions of the model the pairs are for (none: the tokenizer's ``model_max_length``); an unset
    ``max_length`` follows it when it is shorter than the default."""
    import numpy as np
    import pyarrow.compute as pc

    from sepo.io import PROGRESS_MIN_ROWS, arrow_table, datasets_progress, fingerprint
    from sepo.models import ensure_pad_token, tokenizer_fingerprint

    missing = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise SepoError(f"tokenize_pairs needs canonical pairs; the dataset lacks {', '.join(missing)} (read data "
                        "with load_preference_data first)")
    ensure_pad_token(tokenizer)
    if context is None:
        context, whose = tokenizer_context(tokenizer), "the tokenizer"
    options = with_lengths(options, context, whose)
    template = resolve_template(tokenizer, options.chat_template)
    encoder = PairEncoder(tokenizer, template, options)
    existing = [c for c in (*TOKEN_COLUMNS, *TOKEN_ALIGNED_COLUMNS) if c in dataset.column_names]
    if existing:  # re-tokenizing pairs read from a sepo folder
        dataset = dataset.remove_columns(existing)
    # an explicit fingerprint: hashing the tokenizer object is slow and unstable across processes
    key = fingerprint(dataset._fingerprint, tokenizer_fingerprint(tokenizer), template.kind, template.text,
                      asdict(options))
    with datasets_progress(len(dataset) > PROGRESS_MIN_ROWS), bounded_word_cache(tokenizer):
        mapped = dataset.map(encoder, batched=True, batch_size=MAP_BATCH_ROWS, num_proc=options.num_proc,
                             new_fingerprint=key,
                             desc="tokenizing pairs")

    # the bookkeeping columns are read from Arrow, never as Python lists of every row
    problems = arrow_table(mapped).column(_PROBLEM)
    bad = np.flatnonzero(pc.not_equal(problems, "").to_numpy(zero_copy_only=False))
    if bad.size and options.on_invalid == "error":
        row = mapped[int(bad[0])]
        file, number = _row_location(row, int(bad[0]), source)
        more = f" ({bad.size - 1} more invalid row(s) after it)" if bad.size > 1 else ""
        raise DataError(row[_PROBLEM_MESSAGE] + more, file=file, row=number, field=row[_PROBLEM_FIELD],
                        hint=_hint(row[_PROBLEM]))
    reasons = problems.take(bad).to_pylist() if bad.size else []
    dropped = Counter(reasons)
    first_rows: dict[str, list[str]] = {}
    for i, reason in zip(bad.tolist(), reasons):
        if len(first_rows.setdefault(reason, [])) < FIRST_ROWS_KEPT:
            file, number = _row_location(mapped[i], i, source)
            first_rows[reason].append(f"{file} row {number}" if mapped[i].get("source_file") else str(number))
    if bad.size:
        keep = np.ones(len(mapped), dtype=bool)
        keep[bad] = False
        with datasets_progress(False):  # one flat table (no index mapping) for every later read and write
            mapped = mapped.select(np.flatnonzero(keep)).flatten_indices()
    if len(mapped) == 0:  # an empty dataset would be written, then fail unreadably in the next stage
        if not dropped:
            raise DataError("has no rows to tokenize", file=source or "data")
        raise DataError(f"no usable rows after tokenization (every row was invalid: {_counts(dropped)})",
                        file=source or "data", hint=_empty_hint(dropped.most_common(1)[0][0]))
    table = arrow_table(mapped)
    flags = {f: int(pc.sum(table.column(f)).as_py() or 0) for f in _FLAGS}  # over the rows kept
    mapped = mapped.remove_columns([_PROBLEM, _PROBLEM_FIELD, _PROBLEM_MESSAGE, *_FLAGS])
    stats = {
        "rows_in": len(dataset),
        "rows": len(mapped),
        "prompt_truncated": flags["_prompt_truncated"],
        "chosen_truncated": flags["_chosen_truncated"],
        "rejected_truncated": flags["_rejected_truncated"],
        "boundary_retokenized": flags["_boundary_retokenized"],
        "dropped": dict(sorted(dropped.items())),
        "invalid_rows": {r: first_rows[r] for r in sorted(first_rows)},
    }
    return TokenizedPairs(dataset=mapped, stats=stats, chat_template=template.kind, options=options)


def _counts(dropped: Counter) -> str:
    return ", ".join(f"{r} {c}" for r, c in sorted(dropped.items()))


def _empty_hint(reason: str) -> str:
    """What to change when every row was dropped (skipping more rows cannot help)."""
    if reason == "template_error":
        return "the chat template fails on these rows; pass --chat-template none or another template"
    if reason == "identical_responses":
        return "chosen and rejected are the same once cut to max_length; raise --max-length, or check the data"
    return f"most rows fail with {reason} ({REASONS.get(reason, reason)}); check --format, --columns and the data"


def _hint(reason: str) -> str:
    if reason == "template_error":
        return "pass --chat-template none (plain text) or a template that accepts these messages, or --on-invalid skip"
    return f"{REASONS.get(reason, reason)}; {INVALID_HINT}"
