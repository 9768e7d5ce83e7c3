"""Each kind of bad input: one DataError naming file, row and field, or a count per reason when skipping."""

from __future__ import annotations

import json

import pytest

from sepo.data import DataOptions, load_pairs, load_preference_data
from sepo.errors import DataError
from sepo.testing import build_tokenizer

GOOD = {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def line(**fields) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


BAD_ROWS = {
    # reason: (bad line, field named, words of the message)
    "missing_field": (json.dumps({"prompt": "p", "chosen": "c"}).encode(), "rejected", "missing"),
    "not_a_string": (line(chosen=42), "chosen", "must be a string, got int"),
    "empty_response": (line(rejected="   "), "rejected", "the response is empty"),
    "identical_responses": (line(rejected=" Hi!"), "rejected", "chosen and rejected are identical"),
    "malformed_json": (b'{"prompt": "p", "chosen": "c", ', None, "malformed JSON"),
    "bad_utf8": (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', None, "not valid UTF-8"),
    "not_an_object": (b'["p", "c", "r"]', None, "expected a JSON object"),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_is_named_and_can_be_skipped(tmp_path, reason):
    bad, field, words = BAD_ROWS[reason]
    path = write_lines(tmp_path / "bad.jsonl", [line(), line(prompt="Again."), bad, line(prompt="Last.")])
    with pytest.raises(DataError) as err:
        load_preference_data(path, DataOptions())
    e = err.value
    assert (e.file, e.row, e.field) == (path, 3, field)
    assert words in str(e) and f"{path}, row 3" in str(e)
    assert "--on-invalid skip" in str(e)  # says what to do
    raw = load_preference_data(path, DataOptions(on_invalid="skip"))
    assert raw.dropped == {reason: 1}
    assert raw.dataset["index"] == [0, 1, 3]  # the index stays the row in the file
    assert any("skipped 1 invalid row" in n for n in raw.notes)


def test_a_prompt_longer_than_max_length_is_cut_from_the_left_like_any_long_prompt(tmp_path):
    """TRL's rule: a prompt over max_prompt_length keeps BOS (gpt2 has none) and its last tokens, however long
    it is -- one over max_length included (it used to be an invalid row, which dropped 16% of HH-RLHF at 512)."""
    tok = build_tokenizer("gpt2")
    long_prompt = "word " * 40 + "the question?"
    path = write_lines(tmp_path / "long.jsonl", [line(), line(prompt=long_prompt), line(prompt=long_prompt * 2)])
    pairs, meta = load_pairs(path, tok, DataOptions(max_length=32, max_prompt_length=16))
    assert len(pairs) == 3 and meta["counts"]["dropped"] == {} and meta["counts"]["prompt_truncated"] == 2
    for row in (1, 2):
        assert pairs[row]["prompt_input_ids"] == tok(long_prompt)["input_ids"][-16:]
        assert tok.decode(pairs[row]["prompt_input_ids"]).endswith("the question?")
        assert len(pairs[row]["prompt_input_ids"]) + len(pairs[row]["chosen_input_ids"]) <= 32


def test_skip_counts_every_reason_at_once(tmp_path):
    lines = [line()] + [bad for bad, _, _ in BAD_ROWS.values()] + [line(chosen=" Hello.")]
    raw = load_preference_data(write_lines(tmp_path / "mixed.jsonl", lines), DataOptions(on_invalid="skip"))
    assert len(raw.dataset) == 2
    assert raw.dropped == dict.fromkeys(sorted(BAD_ROWS), 1)


def test_bad_rows_in_other_file_types(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("prompt,chosen,rejected\nSay hi., Hi!, No.\nAgain., Same, Same\n")
    with pytest.raises(DataError, match=r"bad.csv, row 2, field 'rejected': chosen and rejected are identical"):
        load_preference_data(str(csv_path), DataOptions())
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([GOOD, {"prompt": "p", "chosen": None, "rejected": "r"}]))
    with pytest.raises(DataError, match=r"bad.json, row 2, field 'chosen': missing"):
        load_preference_data(str(array), DataOptions())
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "p",\n "chosen": }\n]')
    with pytest.raises(DataError, match=r"broken.json, row 3: malformed JSON"):
        load_preference_data(str(broken), DataOptions())


def test_folder_rows_are_named_by_their_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "dataset.json").write_text(json.dumps([{"input": "i", "output_1": "x", "output_2": "y",
                                                               "label": 1}]))
    (tmp_path / "b" / "dataset.json").write_text(json.dumps([{"input": "i", "output_1": "x", "output_2": "y",
                                                               "label": 1}, {"input": "i", "output_1": "x",
                                                                             "output_2": "y", "label": 7}]))
    with pytest.raises(DataError) as err:
        load_preference_data(str(tmp_path), DataOptions())
    assert err.value.file == str(tmp_path / "b" / "dataset.json") and err.value.row == 2
    assert err.value.field == "label" and "must be 1 or 2" in str(err.value)
