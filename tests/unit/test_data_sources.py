"""Reading every source type and format into canonical pairs (sepo.data.load_preference_data)."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from sepo.data import DataOptions, load_preference_data
from sepo.errors import SepoError

ROWS = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5", "id": "a"},
    {"prompt": "Name a colour.", "chosen": " Blue", "rejected": " Seven", "id": "b"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome", "id": "c"},
]


def write_jsonl(path, rows, *, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def check_standard(raw, n=3):
    assert raw.format == "standard"
    ds = raw.dataset
    assert len(ds) == n
    assert ds["index"] == list(range(n))
    assert ds["prompt"] == [r["prompt"] for r in ROWS[:n]]
    assert ds["chosen"] == [r["chosen"] for r in ROWS[:n]]
    assert ds["rejected"] == [r["rejected"] for r in ROWS[:n]]
    assert ds["prompt_messages"][0] == [{"role": "user", "content": "What is 2+2?"}]
    assert ds["id"] == ["a", "b", "c"][:n]  # extra columns kept as metadata


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json-array", "json-lines", "parquet", "csv", "save_to_disk"])
def test_every_file_type_reads_the_same_pairs(tmp_path, kind):
    if kind in ("jsonl", "jsonl.gz"):
        path = write_jsonl(tmp_path / f"pairs.{kind}", ROWS, gz=kind.endswith("gz"))
    elif kind == "json-array":
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "json-lines":
        path = write_jsonl(tmp_path / "pairs.json", ROWS)
    elif kind == "parquet":
        path = tmp_path / "pairs.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "pairs.csv"
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                              "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(path))
    check_standard(load_preference_data(str(path), DataOptions()))


def test_save_to_disk_split_is_chosen_and_a_missing_split_is_named(tmp_path):
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(path))
    check_standard(load_preference_data(str(path), DataOptions(split="test")), n=1)
    with pytest.raises(SepoError, match="no split 'valid'.*train, test"):
        load_preference_data(str(path), DataOptions(split="valid"))


def test_column_mapping(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "id": r["id"]} for r in ROWS]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    opts = DataOptions(columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    check_standard(load_preference_data(str(path), opts))
    with pytest.raises(SepoError, match=r"no column.*answer(.|\n)*question, good, bad"):
        load_preference_data(str(path), DataOptions(columns={"prompt": "answer"}))


def test_missing_file_and_unknown_hub_id_are_clear_errors(tmp_path):
    with pytest.raises(SepoError, match="does not exist"):
        load_preference_data(str(tmp_path / "nope.jsonl"), DataOptions())
    with pytest.raises(SepoError, match="could not load 'sepo-no-such-org/no-such-dataset'.*hub dataset id"):
        load_preference_data("sepo-no-such-org/no-such-dataset", DataOptions())


def test_unrecognised_columns_suggest_a_mapping(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "x", "a": "y"}])
    with pytest.raises(SepoError, match=r"format not recognised.*q, a(.|\n)*--columns"):
        load_preference_data(str(path), DataOptions())


# ---------------------------------------------------------------------------------------------- conversational


def test_conversational_implicit_prompt_keeps_system_and_earlier_turns(tmp_path):
    shared = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    rows = [{"chosen": [*shared, {"role": "assistant", "content": "4"}],
             "rejected": [*shared, {"role": "assistant", "content": "5"}], "score": 1.5}]
    raw = load_preference_data(str(write_jsonl(tmp_path / "c.jsonl", rows)), DataOptions())
    assert raw.format == "conversational"
    row = raw.dataset[0]
    assert row["prompt_messages"] == shared
    assert (row["chosen"], row["rejected"], row["score"]) == ("4", "5", 1.5)
    assert row["prompt"] == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:"


def test_conversational_ultrafeedback_and_trl_styles(tmp_path):
    ultra = {"prompt": "2+2?", "prompt_id": "p1",
             "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}
    trl = {"prompt": [{"role": "user", "content": "3+3?"}], "prompt_id": "p2",
           "chosen": [{"role": "assistant", "content": "6"}], "rejected": [{"role": "assistant", "content": "7"}]}
    ds = load_preference_data(str(write_jsonl(tmp_path / "u.jsonl", [ultra, trl])), DataOptions()).dataset
    assert ds["prompt"] == ["2+2?", "3+3?"]
    assert ds["prompt_messages"] == [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "3+3?"}]]
    assert ds["chosen"] == ["4", "6"] and ds["rejected"] == ["5", "7"] and ds["prompt_id"] == ["p1", "p2"]


def test_conversations_differing_before_the_reply_are_invalid(tmp_path):
    rows = [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "c"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(SepoError, match="row 1, field 'rejected': the chosen and rejected conversations differ"):
        load_preference_data(str(path), DataOptions())


# ---------------------------------------------------------------------------------------------- real files


def test_hh_rlhf_transcripts(hh_path):
    with pytest.raises(SepoError, match=r"test.jsonl.gz, row 87, field 'chosen': the response is empty"):
        load_preference_data(str(hh_path), DataOptions())
    raw = load_preference_data(str(hh_path), DataOptions(on_invalid="skip"))
    assert raw.format == "transcript"
    # 2,312 rows: 4 with an empty final reply, 5 whose dialogues differ before the last Assistant turn
    assert len(raw.dataset) == 2303 and raw.dropped == {"empty_response": 4, "turns_differ": 5}
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    row = raw.dataset[0]
    assert row["index"] == 0 and row["prompt"].endswith("\n\nAssistant:")
    assert row["prompt"] + row["chosen"] == first["chosen"] and row["prompt"] + row["rejected"] == first["rejected"]
    assert row["chosen"].startswith(" ")
    roles = [m["role"] for m in row["prompt_messages"]]
    assert roles[0] == "user" and roles[-1] == "user" and "assistant" in roles
    assert all(m["content"] == m["content"].strip() and "Human:" not in m["content"] for m in row["prompt_messages"])
    # the index is the row in the file, skipped rows included
    assert raw.dataset[86]["index"] == 87


def test_pandalm_majority_labels_and_ties(pandalm_path):
    raw = load_preference_data(str(pandalm_path), DataOptions())
    assert raw.format == "pandalm"
    assert len(raw.dataset) == 894 and raw.dropped == {"tie": 105}  # 422 + 472 majority labels, 105 ties
    assert any("105" in n for n in raw.notes)
    records = json.loads(pandalm_path.read_text())
    votes = {"1": 0, "2": 0}
    for row in raw.dataset:
        src = records[row["index"]]
        label = max((1, 2), key=[src["annotator1"], src["annotator2"], src["annotator3"]].count)
        votes[str(label)] += 1
        assert row["chosen"] == str(src[f"response{label}"]) and row["rejected"] == str(src[f"response{3 - label}"])
        want = src["instruction"] + ("\n\n" + src["input"] if src["input"].strip() else "")
        assert row["prompt"] == want
    assert votes == {"1": 422, "2": 472}
    assert raw.dataset[0]["cmp_key"] == "bloom-7b_llama-7b"


def test_llmbar_folder_and_single_file(llmbar_dir):
    raw = load_preference_data(str(llmbar_dir), DataOptions())
    assert raw.format == "llmbar" and len(raw.dataset) == 419 and raw.dropped == {}
    files = sorted(set(raw.dataset["source_file"]))
    assert files == ["Adversarial/GPTInst/dataset.json", "Adversarial/GPTOut/dataset.json",
                     "Adversarial/Manual/dataset.json", "Adversarial/Neighbor/dataset.json", "Natural/dataset.json"]
    natural = json.loads((llmbar_dir / "Natural" / "dataset.json").read_text())
    single = load_preference_data(str(llmbar_dir / "Natural" / "dataset.json"), DataOptions()).dataset
    assert len(single) == 100
    for row, src in zip(single, natural):
        assert row["prompt"] == src["input"]
        assert row["chosen"] == src[f"output_{src['label']}"] and row["rejected"] == src[f"output_{3 - src['label']}"]


def test_generic_judged_format_with_ties(tmp_path):
    rows = [{"instruction": "Translate", "input": "chat", "output_1": "cat", "output_2": "dog", "label": 1},
            {"instruction": "Add", "input": "", "output_1": "3", "output_2": "2", "label": 2},
            {"instruction": "Pick", "input": "", "output_1": "x", "output_2": "y", "label": "tie"}]
    raw = load_preference_data(str(write_jsonl(tmp_path / "j.jsonl", rows)), DataOptions())
    assert raw.format == "judged" and raw.dropped == {"tie": 1}
    assert raw.dataset["prompt"] == ["Translate\n\nchat", "Add"]
    assert raw.dataset["chosen"] == ["cat", "2"] and raw.dataset["rejected"] == ["dog", "3"]


def test_explicit_format_overrides_detection(tmp_path, hh_path):
    raw = load_preference_data(str(hh_path), DataOptions(format="transcript", on_invalid="skip"))
    assert raw.format == "transcript" and len(raw.dataset) == 2303
    path = write_jsonl(tmp_path / "std.jsonl", ROWS)
    with pytest.raises(SepoError, match="row 1, field 'annotator1': no annotator labels"):
        load_preference_data(str(path), DataOptions(format="pandalm"))


def test_byte_order_mark_and_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n\n" + json.dumps(ROWS[1]).encode() + b"\n")
    raw = load_preference_data(str(path), DataOptions())
    assert len(raw.dataset) == 2 and raw.dataset["index"] == [0, 2]  # the index is the line, blank lines counted


def test_metadata_of_mixed_types_is_dropped_with_a_note(tmp_path):
    rows = [{**ROWS[0], "meta": 1}, {**ROWS[1], "meta": "one"}]
    raw = load_preference_data(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), DataOptions())
    assert "meta" not in raw.dataset.column_names and raw.dataset["id"] == ["a", "b"]
    assert "metadata columns dropped: meta (their values change type from row to row)" in raw.notes
