"""`sepo data inspect` / `sepo data prepare` through sepo.cli.main, and load_pairs on what prepare writes."""

from __future__ import annotations

import json

import datasets
import pytest

from sepo import __version__
from sepo.cli import main
from sepo.data import DataOptions, load_pairs
from sepo.errors import SepoError
from sepo.io import METADATA_FILE, load_dataset_dir, save_dataset
from sepo.models import tokenizer_fingerprint
from sepo.testing import build_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": " I don't know.", "id": i}
        for i in range(6)]


def test_inspect_reports_invalid_rows_and_prepare_refuses_them(tmp_path, capsys):
    """Inspecting is how a user finds bad rows: counted by reason with their row numbers, exit 0. prepare stops
    at the first one with one message naming it and the --on-invalid skip hint."""
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], {"prompt": "p", "chosen": 3, "rejected": "r"}])
    assert main(["data", "inspect", path]) == 0
    out = capsys.readouterr().out
    assert "rows: 2 read, 1 kept; dropped: not_a_string 1" in out
    assert "not_a_string 1 (a text field is not a string): row 2" in out
    assert "stop at the first of them; pass --on-invalid skip" in out
    assert main(["data", "prepare", path, "--tokenizer", "stories260k", "--output", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    assert captured.err.startswith(f"sepo data prepare: error: {path}, row 2, field 'chosen': must be a string")
    assert "--on-invalid skip" in captured.err and not (tmp_path / "out").exists()
    assert main(["data", "inspect", path, "--on-invalid", "skip"]) == 0
    out = capsys.readouterr().out
    assert "rows: 2 read, 1 kept; dropped: not_a_string 1" in out and "stop at the first" not in out


def test_inspect_without_tokenizer_shows_text_statistics(pandalm_path, capsys):
    assert main(["data", "inspect", str(pandalm_path)]) == 0
    out = capsys.readouterr().out
    assert "format: pandalm" in out and "rows: 999 read, 894 kept; dropped: tie 105" in out
    assert "characters" in out and "p50" in out and "p99" in out and "tokens" not in out
    assert out.count("⟦|⟧") >= 4  # two examples, chosen and rejected, boundary marked


def test_inspect_with_tokenizer_shows_token_lengths_and_truncation(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*GOOD, {"prompt": "Tell me a long story. " * 4,
                                                          "chosen": " Once upon a time." * 30, "rejected": " No."}])
    report_code = main(["data", "inspect", path, "--tokenizer", "stories260k", "--max-length", "64",
                        "--max-prompt-length", "32"])
    out = capsys.readouterr().out
    assert report_code == 0
    assert "tokenizer: stories260k (chat template: none; max_length 64, max_prompt_length 32)" in out
    assert "truncated: 1 prompts (from the left), 1 chosen and 0 rejected responses" in out
    lengths = next(line for line in out.splitlines() if line.strip().startswith("prompt") and "tokens" not in line)
    assert lengths.split()[-1] == "32"  # max prompt length after truncation
    assert "prompt (" in out and "tokens) ⟦|⟧ chosen (" in out and "</s>" in out


def test_prepare_writes_tokenized_pairs_and_metadata(llmbar_dir, gpt2_tokenizer_path, tmp_path, capsys):
    out_dir = tmp_path / "pairs"
    assert main(["data", "prepare", str(llmbar_dir), "--tokenizer", str(gpt2_tokenizer_path), "--output",
                 str(out_dir)]) == 0
    assert f"wrote {out_dir}" in capsys.readouterr().out
    ds, meta = load_dataset_dir(out_dir, ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    tok = build_tokenizer(str(gpt2_tokenizer_path))
    assert len(ds) == 419 and meta["num_rows"] == 419
    assert meta["stage"] == "data prepare" and meta["sepo_version"] == __version__ and meta["format"] == "llmbar"
    assert meta["tokenizer"] == str(gpt2_tokenizer_path) and meta["chat_template"] == "none"
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert meta["counts"]["rows"] == 419 and meta["data_options"]["max_length"] == 1024
    assert meta["source"] == str(llmbar_dir) and meta["config"]["output"] == str(out_dir)
    row = ds[0]
    assert row["prompt_input_ids"] == tok(row["prompt"])["input_ids"]
    assert row["chosen_input_ids"][-1] == tok.eos_token_id

    # load_pairs: the prepared folder as it is; another tokenizer is refused with what to do
    again, again_meta = load_pairs(str(out_dir), tok, DataOptions())
    assert list(again["chosen_input_ids"]) == list(ds["chosen_input_ids"]) and again_meta["format"] == "llmbar"
    with pytest.raises(SepoError, match="not with this tokenizer.*re-prepare it: sepo data prepare"):
        load_pairs(str(out_dir), build_tokenizer("stories260k"), DataOptions())

    # a later stage's folder (same columns plus more) keeps its extra columns
    scored = ds.add_column("chosen_rewards", [[0.5] * len(ids) for ids in ds["chosen_input_ids"]])
    save_dataset(scored, tmp_path / "scored", {**meta, "stage": "score"})
    loaded, _ = load_pairs(str(tmp_path / "scored"), tok, DataOptions())
    assert "chosen_rewards" in loaded.column_names
    # ... and for scored data another tokenizer is pointed at projection, which keeps the rewards
    with pytest.raises(SepoError, match="carry the rewards over: sepo select --scores .* --policy-tokenizer"):
        load_pairs(str(tmp_path / "scored"), build_tokenizer("stories260k"), DataOptions())

    # an existing output is not replaced without --overwrite
    assert main(["data", "prepare", str(llmbar_dir), "--tokenizer", "stories260k", "--output", str(out_dir)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_load_pairs_tokenizes_a_raw_source(tmp_path):
    tok = build_tokenizer("gpt2", chat_template="chatml")
    ds, meta = load_pairs(write_jsonl(tmp_path / "p.jsonl", GOOD), tok, DataOptions())
    assert len(ds) == 6 and meta["chat_template"] == "tokenizer" and meta["format"] == "standard"
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok) and meta["counts"]["dropped"] == {}
    assert tok.decode(ds[0]["prompt_input_ids"]) == "<|im_start|>user\nQuestion 0?<|im_end|>\n<|im_start|>assistant\n"


def test_failed_prepare_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], {"prompt": "p", "chosen": "same", "rejected": "same"}])
    out_dir = tmp_path / "out"
    assert main(["data", "prepare", bad, "--tokenizer", "stories260k", "--output", str(out_dir)]) == 2
    assert "row 2, field 'rejected'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.jsonl"]

    # a crash while writing: the temporary folder is removed and the output never appears
    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    from sepo.stages.data import DataPrepareConfig, prepare

    with pytest.raises(OSError, match="disk full"):
        prepare(DataPrepareConfig(path=good, tokenizer="stories260k", output=str(out_dir)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_prepare_requires_tokenizer_and_output(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", GOOD)
    assert main(["data", "prepare", path, "--output", str(tmp_path / "o")]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    assert main(["data", "prepare", path, "--tokenizer", "stories260k"]) == 2
    assert "needs --output" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o" / METADATA_FILE).exists()


def test_a_folder_without_fingerprint_loads_with_a_warning_and_inspects(tmp_path, caplog, capsys):
    tok = build_tokenizer("gpt2")
    ds, _ = load_pairs(write_jsonl(tmp_path / "p.jsonl", GOOD), tok, DataOptions())
    save_dataset(ds, tmp_path / "old", {"stage": "data"})
    with caplog.at_level("WARNING"):
        loaded, meta = load_pairs(str(tmp_path / "old"), tok, DataOptions())
    assert len(loaded) == 6 and meta == {"stage": "data"} and "no tokenizer_fingerprint" in caplog.text
    # a prepared folder is also a source `inspect` can read (its token ids are recomputed)
    assert main(["data", "inspect", str(tmp_path / "old"), "--tokenizer", "stories260k"]) == 0
    assert "rows: 6 read, 6 kept" in capsys.readouterr().out


def test_prepare_refuses_to_write_an_empty_dataset(tmp_path, capsys):
    """Skipping every row used to write a 0-row folder that the next stage could not even load."""
    # every pair's responses differ only after where max_length cuts them
    path = write_jsonl(tmp_path / "p.jsonl", [{**row, "chosen": " Yes, sure.", "rejected": " Yes, no."} for row in GOOD])
    rc = main(["data", "prepare", path, "--tokenizer", "stories260k", "--output", str(tmp_path / "out"),
               "--max-length", "4", "--on-invalid", "skip"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "no usable rows after tokenization (every row was invalid: identical_responses 6)" in err
    assert "raise --max-length" in err and not (tmp_path / "out").exists()


def test_preparing_a_scored_folder_again_drops_its_per_token_columns(tmp_path):
    """Rewards and masks belong to the old ids: carried over as metadata they would no longer line up."""
    tok = build_tokenizer("gpt2")
    ds, meta = load_pairs(write_jsonl(tmp_path / "p.jsonl", GOOD), tok, DataOptions())
    for side in ("chosen", "rejected"):
        ds = ds.add_column(f"{side}_rewards", [[0.5] * len(ids) for ids in ds[f"{side}_input_ids"]])
        ds = ds.add_column(f"{side}_mask", [[True] * len(ids) for ids in ds[f"{side}_input_ids"]])
    save_dataset(ds, tmp_path / "scores", {**meta, "stage": "score"})
    assert main(["data", "prepare", str(tmp_path / "scores"), "--tokenizer", "stories260k", "--output",
                 str(tmp_path / "again")]) == 0
    again, _ = load_dataset_dir(tmp_path / "again")
    assert len(again) == len(GOOD) and "id" in again.column_names  # ordinary metadata columns are kept
    assert not {"chosen_rewards", "rejected_rewards", "chosen_mask", "rejected_mask"} & set(again.column_names)


def test_prepare_records_a_local_tokenizer_as_an_absolute_path(tmp_path, monkeypatch, gpt2_tokenizer_path):
    import shutil

    shutil.copytree(gpt2_tokenizer_path, tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "prepare", write_jsonl(tmp_path / "p.jsonl", GOOD), "--tokenizer", "tok", "--output",
                 "out"]) == 0
    _, meta = load_dataset_dir(tmp_path / "out")
    assert meta["tokenizer"] == str((tmp_path / "tok").resolve())
