"""Polarity-aware selection quality (sepo.tasks.quality) on a real `sepo select` output, against hand counts."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from torch.testing import assert_close

from sepo.cli import main
from sepo.errors import DataError
from sepo.io import load_dataset_dir, save_dataset
from sepo.models import load_tokenizer, tokenizer_fingerprint
from sepo.tasks import get_task
from sepo.tasks.quality import markdown_table, selection_report

# stories260K tokens (the key tokens of the sentiment task by polarity in brackets: positive words of the chosen
# response, negative words of the rejected one; a star marks the first token of a key word):
#   A chosen   "She| was| happy*| and| sa| d| .| </s>"                            key {2}, first {2}
#   A rejected "He| was| sa*| d| but| happy| .| </s>"                             key {2, 3}, first {2}
#   B chosen   "They| s*| m| il| ed| ,| the| n| c| ri| ed| .| </s>"               key {1..4}, first {1}
#   B rejected "I| t| was| b*| ad| ,| so| b*| ad| and| s*| c| ar| y| .| </s>"       key {3, 4, 7, 8, 10..13}, first {3, 7, 10}
TEXTS = [(" She was happy and sad.", " He was sad but happy."), (" They smiled, then cried.", " It was bad, so bad and scary.")]
REWARDS = {  # positions not listed are 0
    ("chosen", 0): {1: 0.1, 2: 0.5, 4: 0.4},
    ("rejected", 0): {2: -0.5, 3: -0.2, 5: 0.3},  # the positive word of a rejected response: high, rightly kept out
    ("chosen", 1): {1: 0.3, 4: 0.1, 8: 0.6},
    ("rejected", 1): {0: -0.3, 3: -0.4, 10: -0.1},
}


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """Scores built by hand, then selected by the real `sepo select` at k = 25%: n = 8 -> 2 tokens, 13 -> 3,
    16 -> 4 (ties broken by position). Chosen: A {2, 4}, B {8, 1, 4}. Rejected (lowest r): A {2, 3},
    B {3, 0, 10, 1} (the fourth is the first of the zeros)."""
    tok = load_tokenizer("stories260k")
    cols = {k: [] for k in ("index", "prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids",
                            "rejected_input_ids", "chosen_rewards", "rejected_rewards")}
    for i, (c, r) in enumerate(TEXTS):
        cols["index"].append(i)
        cols["prompt"].append("Once")
        cols["prompt_input_ids"].append(tok("Once")["input_ids"])
        for side, text in (("chosen", c), ("rejected", r)):
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            cols[side].append(text)
            cols[f"{side}_input_ids"].append(ids)
            cols[f"{side}_rewards"].append([REWARDS[side, i].get(t, 0.0) for t in range(len(ids))])
    root = tmp_path_factory.mktemp("quality")
    save_dataset(datasets.Dataset.from_dict(cols), root / "scores",
                 {"stage": "score", "tokenizer": "stories260k", "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    assert main(["select", "--scores", str(root / "scores"), "--output", str(root / "selected"),
                 "--chosen-ratio", "0.25", "--rejected-ratio", "0.25"]) == 0
    ds, _ = load_dataset_dir(root / "selected")
    assert [len(x) for x in ds["chosen_input_ids"]] == [8, 13] and [len(x) for x in ds["rejected_input_ids"]] == [8, 16]
    chosen_sel = [[i for i, m in enumerate(row) if m] for row in ds["chosen_mask"]]
    rejected_sel = [[i for i, m in enumerate(row) if m] for row in ds["rejected_mask"]]
    assert chosen_sel == [[2, 4], [1, 4, 8]] and rejected_sel == [[2, 3], [0, 1, 3, 10]]
    return ds, tok, root / "selected"


def _values(m: dict) -> torch.Tensor:
    return torch.tensor([m[k] for k in ("auroc", "precision", "base_rate", "ceiling", "recall")], dtype=torch.float64)


def test_selection_report_chosen_side_by_hand(selected):
    """Chosen, every key token: key tokens score (r) 0.5, 0.3, 0, 0, 0.1; the 16 others are 0 x13, 0.1, 0.4, 0.6.
    Wins + ties/2 per key token: 0.5 -> 15; 0.3 -> 14; 0 -> 13 / 2 (twice) = 13; 0.1 -> 13 + 1/2 = 13.5;
    AUROC = 55.5 / (5 * 16) = 0.69375. Selection: k = 2, 3; tp = 1 (A: 'happy') + 2 (B: 's', 'ed') = 3 ->
    precision 3/5; recall 3/5; base rate (2 * 1/8 + 3 * 4/13) / 5 = 0.2346154; ceiling (1 + 3) / 5 = 0.8.
    First token of each key word: keys 0.5 and 0.3 among 19 others (0 x15, 0.1 x2, 0.4, 0.6): (18 + 17) / 38
    = 0.9210526; tp = 2 -> precision 0.4, recall 1; base rate (2 * 1/8 + 3 * 1/13) / 5 = 0.0961538;
    ceiling (1 + 1) / 5 = 0.4."""
    ds, tok, _ = selected
    report = selection_report(ds, tok, get_task("sentiment").key_tokens)
    assert report["pairs"] == 2 and report["has_selection"] and report["chosen"]["score"] == "r"
    every, first = report["chosen"]["every_token"], report["chosen"]["first_token"]
    assert_close(_values(every), torch.tensor([0.69375, 0.6, (0.25 + 12 / 13) / 5, 0.8, 0.6],
                                               dtype=torch.float64))
    assert_close(_values(first), torch.tensor([35 / 38, 0.4, (0.25 + 3 / 13) / 5, 0.4, 1.0], dtype=torch.float64))
    assert (every["tokens"], every["key_tokens"], every["selected_tokens"]) == (21, 5, 5)


def test_selection_report_rejected_side_is_ranked_by_minus_r(selected):
    """Rejected, every key token, score -r: keys 0.5, 0.2 (A) and 0.4, 0.1, 0 x6 (B); the 14 others are
    0 x12, -0.3 (A's 'happy', r = +0.3: not a key token here) and 0.3. Wins + ties/2: 14 + 14 + 13 + 13 +
    6 * (1 + 12/2) = 96 -> AUROC 96 / 140. Selection: k = 2, 4; tp = 2 + 2 = 4 -> precision 4/6; recall 4/10;
    base rate (2 * 2/8 + 4 * 8/16) / 6 = 2.5 / 6; ceiling (2 + 4) / 6 = 1. First token of each key word:
    tp = 1 + 2 ('b', 's') -> precision 3/6, recall 3/4, base rate (2 * 1/8 + 4 * 3/16) / 6 = 1/6, ceiling
    (1 + 3) / 6."""
    ds, tok, _ = selected
    report = selection_report(ds, tok, get_task("sentiment").key_tokens)
    assert report["rejected"]["score"] == "-r"
    assert_close(_values(report["rejected"]["every_token"]),
                 torch.tensor([96 / 140, 4 / 6, 2.5 / 6, 1.0, 0.4], dtype=torch.float64))
    assert_close(_values(report["rejected"]["first_token"])[1:],
                 torch.tensor([0.5, 1 / 6, 4 / 6, 0.75], dtype=torch.float64))


def test_selection_report_without_masks_gives_auroc_only(selected):
    ds, tok, _ = selected
    report = selection_report(ds.remove_columns(["chosen_mask", "rejected_mask"]), tok,
                              get_task("sentiment").key_tokens)
    assert not report["has_selection"]
    assert report["chosen"]["every_token"]["auroc"] == pytest.approx(0.69375)
    assert report["chosen"]["every_token"]["key_fraction"] == pytest.approx(5 / 21)
    assert "precision" not in report["chosen"]["every_token"]
    table = markdown_table(report)
    assert "precision" not in table and "0.69" in table and table.count("\n| ") == 4


def test_markdown_table_has_a_row_per_side_and_counting(selected):
    ds, tok, _ = selected
    table = markdown_table(selection_report(ds, tok, get_task("sentiment").key_tokens), title="oracle")
    rows = [line for line in table.splitlines() if line.startswith("| chosen") or line.startswith("| rejected")]
    assert len(rows) == 4
    assert rows[0].split("|")[3:8] == [" 0.69 ", " 0.600 ", " 0.235 ", " 0.800 ", " 0.600 "]
    assert table.startswith("**oracle**")


def test_key_tokens_of_the_wrong_length_are_refused_naming_the_row(selected):
    ds, tok, _ = selected

    def short(tokenizer, row, *, first_token_only=False):
        return [False] * len(row["chosen_input_ids"]), [False] * (len(row["rejected_input_ids"]) - 1)

    with pytest.raises(DataError, match="row 1.*rejected_input_ids|rejected_input_ids.*row 1"):
        selection_report(ds, tok, short)


def test_inspect_with_task_adds_the_selection_quality(selected, tmp_path, caplog):
    """`sepo inspect --task sentiment` reports the same numbers as selection_report, and logs the table;
    `--key-tokens module:function` with the task's function gives the same section."""
    ds, tok, folder = selected
    with caplog.at_level("INFO"):
        assert main(["inspect", "--scores", str(folder), "--output", str(tmp_path / "a"), "--task", "sentiment"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    quality = summary["selection_quality"]
    assert quality["key_tokens"] == "task sentiment"
    assert quality["chosen"]["every_token"]["auroc"] == pytest.approx(0.69375)
    assert quality["rejected"]["every_token"]["precision"] == pytest.approx(4 / 6)
    assert "selection quality against the key tokens of task sentiment" in caplog.text
    assert "| chosen (top-k of r) | every token of a key word | 0.69 | 0.600 |" in caplog.text
    assert main(["inspect", "--scores", str(folder), "--output", str(tmp_path / "b"),
                 "--key-tokens", "sepo.tasks.sentiment:polarity_key_tokens"]) == 0
    other = json.loads((tmp_path / "b" / "summary.json").read_text())["selection_quality"]
    assert other["key_tokens"] == "sepo.tasks.sentiment:polarity_key_tokens"
    assert {k: v for k, v in other.items() if k != "key_tokens"} == {k: v for k, v in quality.items() if k != "key_tokens"}


@pytest.mark.parametrize("flags, message", [
    (["--task", "nope"], "unknown task 'nope'; known tasks: sentiment"),
    (["--task", "sentiment", "--key-tokens", "a:b"], "not both"),
    (["--key-tokens", "sepo.tasks.sentiment:nothing_here"], "cannot import nothing_here"),
    (["--key-tokens", "no_colon"], "module:function"),
    (["--task", "sentiment", "--tokenizer", "../shared/tokenizers/gpt2"], "not the one"),
])
def test_inspect_refuses_a_bad_key_token_source_in_one_line(selected, tmp_path, capsys, flags, message, shared):
    _, _, folder = selected
    flags = [str(shared / "tokenizers" / "gpt2") if f == "../shared/tokenizers/gpt2" else f for f in flags]
    assert main(["inspect", "--scores", str(folder), "--output", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_selection_report_follows_a_reordered_view_of_the_rows(selected):
    """A `Dataset.select` view (an index mapping over the Arrow table): the key masks and the flat reward and
    mask columns must stay aligned row for row, so pooled numbers do not change with the order of the rows."""
    ds, tok, _ = selected
    key_tokens = get_task("sentiment").key_tokens
    assert selection_report(ds.select([1, 0]), tok, key_tokens) == selection_report(ds, tok, key_tokens)
    only_b = selection_report(ds.select([1]), tok, key_tokens)["chosen"]["every_token"]
    assert (only_b["tokens"], only_b["key_tokens"], only_b["precision"]) == (13, 4, pytest.approx(2 / 3))


AVOID = {0: {4, 5}, 1: {8, 9, 10}}  # chosen positions to avoid, by row index; nothing in rejected responses


def avoid_by_hand(tokenizer, row, *, first_token_only=False):
    return ([i in AVOID[row["index"]] for i in range(len(row["chosen_input_ids"]))],
            [False] * len(row["rejected_input_ids"]))


def test_avoid_tokens_share_of_the_selection_against_its_base_rate(selected):
    """Avoid A {4, 5} of 8, B {8, 9, 10} of 13 (chosen). Selected: A {2, 4}, B {1, 4, 8} -> on avoid tokens
    A {4}, B {8}: share 2 / 5 = 0.4, recall 2 / 5 = 0.4; base rate (2 * 2/8 + 3 * 3/13) / 5 = 0.238462;
    avoid fraction 5 / 21. AUROC of r, avoid vs the 16 others (12 zeros, 0.1 x2, 0.3, 0.5): 0.4 beats 15,
    0.6 beats 16, each of the three zeros ties 12 -> 6: (15 + 16 + 18) / (5 * 16) = 0.6125. The rejected
    side has none: no `avoid` entry."""
    ds, tok, _ = selected
    report = selection_report(ds, tok, get_task("sentiment").key_tokens, avoid_by_hand)
    avoid = report["chosen"]["avoid"]
    got = torch.tensor([avoid[k] for k in ("share", "base_rate", "recall", "avoid_fraction", "auroc")],
                       dtype=torch.float64)
    assert_close(got, torch.tensor([0.4, (0.5 + 9 / 13) / 5, 0.4, 5 / 21, 0.6125], dtype=torch.float64))
    assert (avoid["tokens"], avoid["avoid_tokens"], avoid["selected_tokens"]) == (21, 5, 5)
    assert "avoid" not in report["rejected"]
    # the key-token numbers do not change
    assert report["chosen"]["every_token"] == selection_report(ds, tok, get_task("sentiment").key_tokens)["chosen"][
        "every_token"]
    table = markdown_table(report)
    assert "| chosen (top-k of r) | 0.61 | 0.238 | 0.400 | 0.238 | 0.400 |" in table
    without = selection_report(ds.remove_columns(["chosen_mask", "rejected_mask"]), tok,
                               get_task("sentiment").key_tokens, avoid_by_hand)["chosen"]["avoid"]
    assert "share" not in without and without["auroc"] == pytest.approx(0.6125)
