"""What a first run on real data shows: lengths that follow the model, invalid rows found by inspecting, and
one clean line per event (no progress bars on small loads, no warnings with source lines, no library chatter)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sepo
from sepo.cli import main
from sepo.data import DataOptions, load_pairs
from sepo.data.options import with_lengths
from sepo.io import read_metadata
from sepo.models import load_causal_lm, load_tokenizer

SRC = str(Path(sepo.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def hh_head(tmp_path_factory, hh_path) -> Path:
    """The first 12 rows of HH-RLHF harmless-base test: valid, and row 4's prompt alone is over 512 tokens."""
    path = tmp_path_factory.mktemp("hh") / "hh12.jsonl"
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(12)))
    return path


def test_max_length_follows_a_shorter_model_context_once():
    """Unset max_length: 1024, or the context when that is shorter -- said once; an explicit value is kept."""
    options = DataOptions()
    assert options.max_length is None
    assert with_lengths(options, 4096).max_length == 1024 and with_lengths(options, None).max_length == 1024
    short = with_lengths(options, 512, "the oracle stories260k")
    assert (short.max_length, short.max_prompt_length) == (512, 256)
    assert with_lengths(DataOptions(max_length=2048), 512).max_length == 2048  # the user's choice stands
    assert with_lengths(DataOptions(max_prompt_length=100), 512).max_prompt_length == 100


def test_score_on_hh_rlhf_with_stories260k_and_default_lengths(tmp_path, capsys, caplog, monkeypatch, hh_head,
                                                              tiny_llama_stories):
    """stories260K has 512 positions, the default max_length is 1024: raw data is now cut to 512 at tokenization
    (prompts from the left, responses from the right) instead of being refused by the context-length check."""
    import sepo.data.options

    monkeypatch.setattr(sepo.data.options, "_said", set())
    out = tmp_path / "scores"
    with caplog.at_level("INFO", logger="sepo"):
        assert main(["score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories), "--data",
                     str(hh_head), "--output", str(out)]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("max_length")]
    assert said == ["max_length 512: the oracle stories260k takes 512 positions, fewer than the default 1024 (pass "
                    "--max-length to choose)"]
    data_meta = read_metadata(out)["data_metadata"]
    assert data_meta["data_options"]["max_length"] == 512 and data_meta["counts"]["rows"] == 12
    assert data_meta["counts"]["prompt_truncated"] >= 1 and data_meta["counts"]["dropped"] == {}
    # an explicit max_length is the user's: longer than the oracle's context, it is still refused
    rc = main(["score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories), "--data", str(hh_head),
               "--output", str(tmp_path / "scores-1024"), "--max-length", "1024"])
    assert rc == 2 and "longer than the oracle stories260k can take (512 positions" in capsys.readouterr().err


def test_load_pairs_follows_the_tokenizer_when_no_model_is_named(hh_head):
    """`sepo data prepare` knows only a tokenizer: its model_max_length (512 for stories260K) is the context."""
    tok = load_tokenizer("stories260k")
    pairs, meta = load_pairs(str(hh_head), tok, DataOptions())
    assert meta["data_options"]["max_length"] == 512
    assert max(len(p) + max(len(c), len(r)) for p, c, r in zip(pairs["prompt_input_ids"], pairs["chosen_input_ids"],
                                                               pairs["rejected_input_ids"])) <= 512


def test_inspect_on_real_hh_rlhf_reports_invalid_rows_and_exits_0(hh_path, capsys):
    assert main(["data", "inspect", str(hh_path), "--examples", "0"]) == 0
    out = capsys.readouterr().out
    assert "rows: 2312 read, 2303 kept; dropped: empty_response 4, turns_differ 5" in out
    assert "empty_response 4 (a response is empty): rows 87, 517, 926, 1104" in out
    assert "turns_differ 5 (" in out and "pass --on-invalid skip to drop and count them" in out
    # prepare still refuses by default, naming the first bad row and the hint
    assert main(["data", "prepare", str(hh_path), "--tokenizer", "stories260k", "--output", "unused"]) == 2
    err = capsys.readouterr().err
    assert "row 87, field 'chosen': the response is empty" in err and "--on-invalid skip" in err


def test_skipped_rows_are_reported_once(hh_path, tmp_path, capfd):
    assert main(["data", "prepare", str(hh_path), "--tokenizer", "stories260k", "--on-invalid", "skip",
                 "--output", str(tmp_path / "pairs")]) == 0
    captured = capfd.readouterr()
    both = captured.out + captured.err
    assert both.count("empty_response") == 1 and "dropped: empty_response 4, turns_differ 5" in captured.out
    assert "Flattening" not in both and "Saving the dataset" not in both  # no bars for a few thousand rows


def test_a_model_load_prints_nothing(capfd):
    load_causal_lm("stories260k", trainable=False)
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and captured.out == ""


def test_the_cli_shows_sepo_lines_and_no_library_info():
    """matplotlib's first-run "generated new fontManager" (INFO) and the like stay out; sepo's INFO lines stay in,
    as plain messages."""
    code = ("from sepo.cli import configure_logging; configure_logging(); import logging; "
            "logging.getLogger('matplotlib.font_manager').info('generated new fontManager'); "
            "logging.getLogger('accelerate.utils').info('chatter'); logging.getLogger('sepo.stages.x').info('a line')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0 and done.stderr == "a line\n" and done.stdout == ""
