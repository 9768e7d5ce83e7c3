"""`sepo demo --quick` end to end: the matched-KL summary and its rows, sanity of the numbers, plots, and a
resumed rerun that recomputes nothing."""

from __future__ import annotations

import json
import math

import pytest

from sepo.cli import main

METHODS = {"dpo", "simpo", "sepo", "sepo_random", "sepo_weak"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    return out, json.loads((out / "results.json").read_text()), rows


@pytest.mark.slow
def test_quick_demo_results_schema(demo):
    out, results, rows = demo
    frontier = results["summary"]["frontier"]
    assert set(frontier["methods"]) == METHODS
    assert [v["budget"] for v in frontier["verdicts"]] == [1.0, 3.0, 10.0]
    assert all(v["text"] and (v["best"] in METHODS) for v in frontier["verdicts"])
    for method in frontier["methods"].values():
        for at in method["at_budget"].values():
            assert math.isfinite(at["value"]) and at["low"] <= at["value"] <= at["high"]
    # quick: two learning rates x two seeds per method, plus the reference
    assert results["strengths"] == {m: 2 for m in METHODS} and results["seeds"] == [0, 1]
    assert len(rows) == 1 + len(METHODS) * 2 * 2 and all(r["status"] == "ok" for r in rows)
    for png in ("frontier.png", "concentration.png", "token_rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "Fewer points than the full demo" in table  # the quick demo says what it leaves out
    assert "| KL ≤ 1 |" in table and all(f"| {m} |" in table for m in METHODS)
    # the polarity-aware selection quality of both oracles and of the random control
    selection = results["summary"]["selection"]
    assert set(selection) == {"oracle", "weak"} and set(selection["oracle"]) == {"oracle", "random"}
    assert "## Selection quality" in table and "first token of each key word" in table


@pytest.mark.slow
def test_quick_demo_numbers_are_sane(demo):
    _, results, rows = demo
    ref = rows[0]
    # the untrained model against itself: identical samples, no KL, trained on nothing
    assert (ref["method"], ref["win_rate"], ref["kl"], ref["token_fraction"]) == ("reference", 0.5, 0.0, 0.0)
    fraction = {r["method"]: r["token_fraction"] for r in rows}
    # SePO and its control train on the same number of tokens, about k = 30% of them; DPO/SimPO on all
    assert fraction["sepo"] == pytest.approx(fraction["sepo_random"])
    assert 0.2 < fraction["sepo"] <= 0.3 and 0.2 < fraction["sepo_weak"] <= 0.3
    assert fraction["dpo"] == fraction["simpo"] == 1.0
    # every trained policy moved away from the reference
    assert all(r["kl"] != 0.0 for r in rows[1:])
    assert results["weak_to_strong"]["weak_oracle_parameters"] < results["weak_to_strong"]["policy_parameters"]


@pytest.mark.slow
def test_rerunning_the_demo_resumes_without_recomputing(demo):
    out, results, _ = demo
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("points/**/result.json")}
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["summary"]["frontier"] == results["summary"]["frontier"] and again["seconds"] < results["seconds"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/**/result.json")} == stamps
