"""Detecting a preference format and normalising each record to the canonical pair.

Canonical pair (one dict per row)::

    prompt           str   the prompt as plain text
    prompt_messages  list  [{"role", "content"}]: the prompt as a conversation (a single user message for a
                           plain-text prompt; system messages and earlier turns kept)
    chosen, rejected str   the response text only

Every other source column is kept as metadata. Formats:

- ``standard``: ``prompt`` / ``chosen`` / ``rejected`` strings (responses follow the prompt verbatim).
- ``conversational``: ``chosen`` / ``rejected`` message lists; the prompt is an explicit ``prompt`` column (a
  string or messages) or, when absent, the messages the two conversations share (UltraFeedback-binarized).
  The response is the final assistant message.
- ``transcript``: HH-RLHF dialogues ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is everything up to and
  including the last ``"\\n\\nAssistant:"``; the response is the text after it (with its leading space, so
  ``prompt + chosen`` is the original dialogue).
- ``pandalm``: ``instruction``, ``input``, ``response1/2`` and three annotators (1, 2, or 0 = tie); the majority
  label picks the chosen response, majority ties are dropped and counted.
- ``llmbar`` / ``judged``: ``input`` (LLMBar) or ``instruction`` (+ ``input``), ``output_1/2`` and a ``label``
  (1 or 2) naming the better output. A label of 0 or "tie" is dropped and counted.

For judged formats the prompt is ``instruction + "\\n\\n" + input`` when the input is non-empty. Their outputs
are judged model generations, so an empty output is kept (the model generated nothing and was judged for it;
its response is EOS alone) and a JSON scalar (PandaLM stores a few answers "True" as ``true``) is read as its
text; both are counted in the notes. Everywhere else an empty or non-string response is an invalid row.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from sepo.errors import ConfigError, DataError

TRANSCRIPT_HUMAN = "\n\nHuman:"
TRANSCRIPT_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")
CANONICAL = ("prompt", "chosen", "rejected")
REPAIRS = "_repairs"  # key of a normalised pair listing what was read leniently (counted, then removed)
MAPPABLE = ("prompt", "chosen", "rejected", "instruction", "input", "output_1", "output_2", "label")

# Why a row was not kept. Rows dropped for "tie" are dropped by design; every other reason is an invalid row
# (an error, or a count with on_invalid="skip").
REASONS = {
    "tie": "the judges preferred neither response",
    "bad_utf8": "not valid UTF-8",
    "malformed_json": "not valid JSON",
    "not_an_object": "not a JSON object",
    "missing_field": "a required field is missing or null",
    "not_a_string": "a text field is not a string",
    "empty_response": "a response is empty",
    "identical_responses": "chosen and rejected are the same",
    "turns_differ": "the two conversations differ before the final reply",
    "no_assistant_reply": "a conversation does not end with an assistant reply",
    "bad_label": "the preference label is not 1, 2 or a tie",
    "empty_prompt": "the prompt has no tokens (and the tokenizer adds no BOS)",
    "template_error": "the chat template could not render the prompt",
}


class RowProblem(Exception):
    """An unusable row, raised by a normaliser; becomes a DataError or a skip count."""

    def __init__(self, reason: str, field: str | None, message: str, hint: str | None = None):
        super().__init__(message)
        self.reason, self.field, self.message, self.hint = reason, field, message, hint


# ---------------------------------------------------------------------------------------------- detection


def _first_value(rows: list[dict], column: str):
    return next((r[column] for r in rows[:100] if r.get(column) is not None), None)


def detect_format(columns: list[str], rows: list[dict], *, label: str) -> str:
    """The format of a table from its column names (and the type of its first ``chosen`` value)."""
    cols = set(columns)
    if {"instruction", "response1", "response2", "annotator1"} <= cols:
        return "pandalm"
    if {"output_1", "output_2", "label"} <= cols:
        return "judged" if "instruction" in cols else "llmbar"
    if {"chosen", "rejected"} <= cols:
        first = _first_value(rows, "chosen")
        if isinstance(first, list):
            return "conversational"
        if "prompt" in cols:
            return "standard"
        if isinstance(first, str) and TRANSCRIPT_ASSISTANT in first:
            return "transcript"
        raise DataError(
            "has chosen/rejected text but no prompt column, and the texts are not Human/Assistant transcripts",
            file=label, field="prompt",
            hint=f"name the prompt column with --columns prompt=NAME (columns: {', '.join(columns)})")
    raise DataError(
        f"format not recognised from its columns ({', '.join(columns) or 'none'})", file=label,
        hint="expected prompt/chosen/rejected, chosen/rejected conversations or transcripts, PandaLM or LLMBar "
             "columns; map yours with --columns prompt=question,chosen=good,rejected=bad or pass --format")


def check_column_mapping(mapping: dict[str, str], *, label: str, columns: list[str]) -> None:
    """Refuse a ``--columns`` mapping onto unknown canonical names or from columns the source does not have."""
    unknown = [k for k in mapping if k not in MAPPABLE]
    if unknown:
        raise ConfigError(f"data_options.columns: unknown canonical name(s) {', '.join(unknown)}; map onto "
                          f"{', '.join(MAPPABLE)} (e.g. prompt=question,chosen=good,rejected=bad)")
    missing = [src for src in mapping.values() if src not in columns]
    if missing:
        raise DataError(f"has no column(s) {', '.join(missing)} named in --columns", file=label,
                        hint=f"its columns are: {', '.join(columns)}")


def rename_columns(row: dict, mapping: dict[str, str]) -> dict:
    """Rename source columns to canonical names in place (``{"prompt": "question"}`` renames question)."""
    values = {canonical: row.pop(src, None) for canonical, src in mapping.items()}
    row.update(values)
    return row


# ---------------------------------------------------------------------------------------------- field checks


def text_field(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise RowProblem("missing_field", name, "missing (or null)",
                         hint="every row needs it; map another column with --columns or pass --on-invalid skip")
    if not isinstance(value, str):
        raise RowProblem("not_a_string", name, f"must be a string, got {type(value).__name__}: {str(value)[:60]!r}")
    return value


def check_responses(chosen: str, rejected: str, *, chosen_field: str = "chosen",
                    rejected_field: str = "rejected", allow_empty: bool = False) -> None:
    for name, text in ((chosen_field, chosen), (rejected_field, rejected)):
        if not text.strip() and not allow_empty:
            raise RowProblem("empty_response", name, "the response is empty",
                             hint="a preference pair needs two non-empty responses; pass --on-invalid skip to drop such rows")
    if chosen == rejected:
        raise RowProblem("identical_responses", rejected_field, "chosen and rejected are identical",
                         hint="such a pair carries no preference; pass --on-invalid skip to drop such rows")


def user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def messages_field(row: dict, name: str) -> list[dict]:
    """A list of {role, content} with string contents, reduced to exactly those two keys."""
    value = row.get(name)
    if value is None:
        raise RowProblem("missing_field", name, "missing (or null)")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowProblem("not_a_string", name, f"must be a list of {{role, content}} messages, got "
                         f"{type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowProblem("not_a_string", f"{name}[{i}]", "each message needs a string role and a string content")
        out.append({"role": role, "content": content})
    return out


def messages_to_text(messages: list[dict]) -> str:
    """The plain-text prompt of a conversation: one user message is its content; longer conversations are
    written as a Human/Assistant transcript ending in "\\n\\nAssistant:" (the HH-RLHF convention)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)
    return turns + TRANSCRIPT_ASSISTANT


# ---------------------------------------------------------------------------------------------- formats


def standard(row: dict) -> dict:
    prompt, chosen, rejected = (text_field(row, n) for n in CANONICAL)
    check_responses(chosen, rejected)
    # pairs written by sepo (a prepared folder read again) carry their conversation beside the text prompt
    messages = messages_field(row, "prompt_messages") if row.get("prompt_messages") else user_prompt(prompt)
    return {"prompt": prompt, "prompt_messages": messages, "chosen": chosen, "rejected": rejected}


def _final_reply(messages: list[dict], name: str) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        raise RowProblem("no_assistant_reply", name, "the conversation must end with an assistant message")
    return messages[-1]["content"]


def conversational(row: dict) -> dict:
    chosen_msgs, rejected_msgs = messages_field(row, "chosen"), messages_field(row, "rejected")
    chosen, rejected = _final_reply(chosen_msgs, "chosen"), _final_reply(rejected_msgs, "rejected")
    context = chosen_msgs[:-1]  # what precedes the chosen reply
    if context != rejected_msgs[:-1]:
        raise RowProblem("turns_differ", "rejected", "the chosen and rejected conversations differ before "
                         "their final assistant message", hint="the two conversations must share every earlier turn")
    explicit = row.get("prompt")
    if explicit is None:
        if not context:
            raise RowProblem("missing_field", "prompt", "no prompt column and the conversations share no messages")
        prompt_messages = context
    elif isinstance(explicit, str):
        # UltraFeedback-binarized repeats the prompt as the conversation's first user turn; the conversation
        # (with any system message) is the richer form. TRL-style rows carry the reply alone.
        prompt_messages = context if context else user_prompt(explicit)
    elif isinstance(explicit, list):
        prompt_messages = messages_field(row, "prompt")
        if context and context != prompt_messages:
            raise RowProblem("turns_differ", "prompt", "the prompt messages differ from the conversation before "
                             "the final assistant message")
    else:
        raise RowProblem("not_a_string", "prompt", f"must be a string or a message list, got {type(explicit).__name__}")
    if prompt_messages[-1]["role"] == "assistant":
        raise RowProblem("turns_differ", "prompt", "the prompt ends with an assistant message")
    check_responses(chosen, rejected)
    prompt = explicit if isinstance(explicit, str) else messages_to_text(prompt_messages)
    return {"prompt": prompt, "prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}


def transcript_messages(prompt: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user a, assistant b, user c."""
    parts = _TURN.split(prompt[: -len(TRANSCRIPT_ASSISTANT)])
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for marker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if marker == TRANSCRIPT_HUMAN else "assistant", "content": content.strip()})
    return messages or user_prompt("")


def transcript(row: dict) -> dict:
    chosen_full, rejected_full = text_field(row, "chosen"), text_field(row, "rejected")
    cut_c, cut_r = chosen_full.rfind(TRANSCRIPT_ASSISTANT), rejected_full.rfind(TRANSCRIPT_ASSISTANT)
    for name, cut in (("chosen", cut_c), ("rejected", cut_r)):
        if cut < 0:
            raise RowProblem("no_assistant_reply", name, 'the transcript has no "\\n\\nAssistant:" turn')
    prompt = chosen_full[: cut_c + len(TRANSCRIPT_ASSISTANT)]
    if prompt != rejected_full[: cut_r + len(TRANSCRIPT_ASSISTANT)]:
        # e.g. HH-RLHF rows where an earlier reply differs, or a reply that itself contains "  Human: ..."
        raise RowProblem("turns_differ", "rejected", "the chosen and rejected dialogues differ before the last "
                         '"Assistant:" turn', hint="the two dialogues must share every turn but the last reply; "
                         "pass --on-invalid skip to drop such rows")
    chosen, rejected = chosen_full[len(prompt):], rejected_full[len(prompt):]
    check_responses(chosen, rejected)
    return {"prompt": prompt, "prompt_messages": transcript_messages(prompt), "chosen": chosen, "rejected": rejected}


def _judged_prompt(row: dict, *, instruction_field: str | None) -> str:
    if instruction_field is None:
        return text_field(row, "input")
    instruction = text_field(row, instruction_field)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowProblem("not_a_string", "input", f"must be a string, got {type(extra).__name__}")
    return instruction + "\n\n" + extra if extra and extra.strip() else instruction


class Tie(Exception):
    """The judges preferred neither output: the row is dropped and counted, never an error."""


def _judged_output(row: dict, name: str, repairs: list[str]) -> str:
    """A judged output as text. PandaLM stores a few answers "True" as JSON ``true``: scalars are read as the
    text they stand for (and counted), anything else non-string is an error."""
    value = row.get(name)
    if isinstance(value, (bool, int, float)):
        repairs.append("scalar_output_as_text")
        return str(value)
    text = text_field(row, name)
    if not text.strip():
        repairs.append("empty_output_kept")
    return text


def _pick(row: dict, label, first: str, second: str, label_field: str, repairs: list[str]) -> tuple[str, str]:
    one, two = _judged_output(row, first, repairs), _judged_output(row, second, repairs)
    key = str(label).strip().lower() if label is not None else ""
    if key in ("0", "tie", "0.0"):
        raise Tie
    if key in ("1", "1.0", first):
        chosen, rejected, cf, rf = one, two, first, second
    elif key in ("2", "2.0", second):
        chosen, rejected, cf, rf = two, one, second, first
    else:
        raise RowProblem("bad_label", label_field, f"must be 1 or 2 (or 0 for a tie), got {label!r}")
    # a judged output that is empty is a real generation (the model said nothing) with a real verdict: kept,
    # its response is EOS alone
    check_responses(chosen, rejected, chosen_field=cf, rejected_field=rf, allow_empty=True)
    return chosen, rejected


def pandalm(row: dict) -> dict:
    votes = []
    for name in ("annotator1", "annotator2", "annotator3"):
        if name not in row:
            continue
        try:
            votes.append(int(row[name]))
        except (TypeError, ValueError):
            raise RowProblem("bad_label", name, f"must be 0, 1 or 2, got {row[name]!r}") from None
    if not votes:
        raise RowProblem("missing_field", "annotator1", "no annotator labels")
    label, count = Counter(votes).most_common(1)[0]
    if count * 2 <= len(votes):  # no strict majority counts as a tie
        label = 0
    prompt = _judged_prompt(row, instruction_field="instruction")
    repairs: list[str] = []
    chosen, rejected = _pick(row, label, "response1", "response2", "annotator1", repairs)
    return {"prompt": prompt, "prompt_messages": user_prompt(prompt), "chosen": chosen, "rejected": rejected,
            REPAIRS: repairs}


def judged(row: dict) -> dict:
    prompt = _judged_prompt(row, instruction_field="instruction" if "instruction" in row else None)
    repairs: list[str] = []
    chosen, rejected = _pick(row, row.get("label"), "output_1", "output_2", "label", repairs)
    return {"prompt": prompt, "prompt_messages": user_prompt(prompt), "chosen": chosen, "rejected": rejected,
            REPAIRS: repairs}


NORMALISERS: dict[str, Callable[[dict], dict]] = {
    "standard": standard,
    "conversational": conversational,
    "transcript": transcript,
    "pandalm": pandalm,
    "llmbar": judged,
    "judged": judged,
}

# Source columns a format consumes (not kept as metadata).
CONSUMED = {
    "standard": {"prompt", "chosen", "rejected"},
    "conversational": {"prompt", "chosen", "rejected"},
    "transcript": {"chosen", "rejected"},
    "pandalm": {"instruction", "input", "response1", "response2"},
    "llmbar": {"input", "output_1", "output_2"},
    "judged": {"instruction", "input", "output_1", "output_2"},
}
