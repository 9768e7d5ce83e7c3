"""`sepo inspect`: statistics and reward concentration on hand-made rewards, plots, and the HTML page in Chromium."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import datasets
import pytest

from sepo.cli import main
from sepo.io import read_metadata, save_dataset
from sepo.models import load_tokenizer, tokenizer_fingerprint
from sepo.stages.inspect import token_texts

TEXTS = [("Tom said", " <b>yes</b> & ok", " no way."), ("Lily ran.", " She won the race.", " She fell.")]


@pytest.fixture(scope="module")
def selected_dir(tmp_path_factory):
    """Hand-made selected pairs (stories260K tokenizer). Row 0: chosen token 0 has r = 1, rejected token 0 has
    r = -1, every other token 0 -> in each response one token carries all of sum |r|. Row 1: chosen all 0.5
    (80% of sum |r| needs ceil(0.8 * n) of its n tokens), rejected all 0 (no reward to share out)."""
    tok = load_tokenizer("stories260k")
    cols = {k: [] for k in ("index", "prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids",
                            "rejected_input_ids", "chosen_rewards", "rejected_rewards", "chosen_mask", "rejected_mask")}
    for i, (p, c, r) in enumerate(TEXTS):
        cols["index"].append(i)
        for name, text in (("prompt", p), ("chosen", c), ("rejected", r)):
            cols[name].append(text)
        cols["prompt_input_ids"].append(tok(p)["input_ids"])
        for side, text in (("chosen", c), ("rejected", r)):
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            cols[f"{side}_input_ids"].append(ids)
            if i == 0:
                rewards = [1.0 if side == "chosen" else -1.0] + [0.0] * (len(ids) - 1)
            else:
                rewards = [0.5 if side == "chosen" else 0.0] * len(ids)
            cols[f"{side}_rewards"].append(rewards)
            cols[f"{side}_mask"].append([j == 0 for j in range(len(ids))])
    folder = tmp_path_factory.mktemp("inspect") / "selected"
    save_dataset(datasets.Dataset.from_dict(cols), folder, {"stage": "select", "tokenizer": "stories260k",
                                                           "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    return folder, cols


def test_inspect_summary_concentration_and_files(tmp_path, selected_dir):
    folder, cols = selected_dir
    assert main(["inspect", "--scores", str(folder), "--output", str(tmp_path / "report")]) == 0
    report = tmp_path / "report"
    for name in ("concentration.png", "reward_histograms.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_metadata(report)["stage"] == "inspect"
    summary = json.loads((report / "summary.json").read_text())
    nc = [len(x) for x in cols["chosen_input_ids"]]
    nr = [len(x) for x in cols["rejected_input_ids"]]
    shares = {"chosen": [1 / nc[0], -(-8 * nc[1] // 10) / nc[1]], "rejected": [1 / nr[0]]}  # ceil(0.8 n) / n
    conc = summary["concentration"]
    assert conc["level"] == 0.8
    assert conc["responses"]["responses"] == 3 and conc["responses"]["responses_without_reward"] == 1
    for group, values in (*shares.items(), ("responses", shares["chosen"] + shares["rejected"])):
        assert conc[group]["tokens_for_level_mean"] == pytest.approx(sum(values) / len(values), rel=1e-6)
        assert max(conc[group]["mean_curve"]) <= 1.0 and conc[group]["mean_curve"][-1] == pytest.approx(1.0)
    # the rejected mean curve is row 0's alone: all of sum |r| from the first 1 / n_r tokens on
    assert conc["rejected"]["tokens_for_level_on_mean_curve"] == pytest.approx(-(-100 // nr[0]) / 100)
    assert summary["pairs"]["oracle_prefers_chosen"] == 1.0
    assert summary["chosen"]["selected"]["count"] == 2 and summary["chosen"]["tokens"]["count"] == sum(
        len(x) for x in cols["chosen_input_ids"])
    assert summary["rejected"]["selected"]["mean"] == pytest.approx(-0.5)  # -1 (row 0) and 0 (row 1)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    return None


def test_html_page_renders_tokens_in_headless_chromium(tmp_path, selected_dir):
    folder, cols = selected_dir
    assert main(["inspect", "--scores", str(folder), "--output", str(tmp_path / "report")]) == 0
    page = tmp_path / "report" / "examples.html"
    source = page.read_text()
    assert "<b>yes" not in source and "&lt;" in source  # the token '<' is escaped, never markup
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium found (install Debian's `chromium` package to run this test)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    dom = done.stdout
    assert done.returncode == 0 and "<body>" in dom, done.stderr[-2000:]
    assert dom.count("class=\"tok") == sum(source.count(f"class='tok{s}'") for s in ("", " sel"))
    assert dom.count("class=\"tok sel\"") == 4  # one selected token per response
    # every token's text, '<', 'b', '>' and '&' among them, rendered as text inside its span (not as markup)
    tok = load_tokenizer("stories260k")
    for side in ("chosen", "rejected"):
        for ids in cols[f"{side}_input_ids"]:
            for text in token_texts(tok, ids):
                assert f">{html.escape(text, quote=False)}</span>" in dom, text
    assert "&lt;" in dom and "&amp;" in dom and "<b>yes" not in dom


def test_inspect_says_where_it_wrote_even_when_the_oracle_prefers_no_chosen_response(tmp_path, caplog):
    """The oracle prefers no chosen response here: the report is still written, and says so."""
    tok = load_tokenizer("stories260k")
    ids = tok(" no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = {"index": 0, "prompt": "p", "prompt_input_ids": tok("p")["input_ids"], "chosen_input_ids": ids,
           "rejected_input_ids": ids, "chosen_rewards": [-1.0] * len(ids), "rejected_rewards": [1.0] * len(ids)}
    save_dataset(datasets.Dataset.from_list([row]), tmp_path / "scores", {"stage": "score", "tokenizer": "stories260k"})
    with caplog.at_level("INFO"):
        assert main(["inspect", "--scores", str(tmp_path / "scores"), "--output", str(tmp_path / "report")]) == 0
    assert "prefers the chosen response in 0.0% of 1 pairs" in caplog.text
    assert f"wrote {tmp_path / 'report'}" in caplog.text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["pairs"]["oracle_prefers_chosen"] == 0.0 and summary["pairs"]["mean_reward_margin"] < 0
    # each response spreads its |r| evenly: 80% needs ceil(0.8 n) of n tokens, whatever the sign
    n = len(ids)
    assert summary["concentration"]["responses"]["tokens_for_level_mean"] == pytest.approx(-(-8 * n // 10) / n)


def test_concentration_summary_keeps_every_share_and_a_gaussian_reference():
    """Chosen [0, 0] has no reward (None), [1, 0, 0, 0] needs 1 of 4 tokens for 80% (0.25); rejected [5] needs
    its one token (1.0), [0.5, 0.5] both (1.0). Mean over the three with a reward: 0.75. Gaussian rewards of
    one-token responses always need their one token: 1.0."""
    from sepo.stages.inspect import concentration_summary

    ds = datasets.Dataset.from_dict({"chosen_rewards": [[0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
                                     "rejected_rewards": [[5.0], [0.5, 0.5]]})
    out = concentration_summary(ds)
    assert out["shares"] == {"chosen": [None, 0.25], "rejected": [1.0, 1.0]}
    assert out["responses"]["tokens_for_level_mean"] == pytest.approx(0.75)
    assert 0 < out["gaussian_tokens_for_level_mean"] <= 1
    ones = datasets.Dataset.from_dict({"chosen_rewards": [[0.3]] * 3, "rejected_rewards": [[-1.0]] * 3})
    assert concentration_summary(ones)["gaussian_tokens_for_level_mean"] == 1.0
