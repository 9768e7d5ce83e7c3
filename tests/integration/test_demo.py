"""`sepo demo --quick` end to end: the results schema, sanity of the numbers, plots, and a resumed rerun."""

from __future__ import annotations

import json
import math

import pytest

from sepo.cli import main

METHODS = {"reference", "dpo", "simpo", "sepo", "sepo_random", "sepo_weak"}
FIELDS = ("gold_reward", "win_rate", "kl", "pref_accuracy", "token_fraction")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_demo_results_schema(demo):
    out, results = demo
    assert set(results["methods"]) == METHODS
    for name, m in results["methods"].items():
        for f in FIELDS:
            assert isinstance(m[f], float) and math.isfinite(m[f]), (name, f)
        assert 0.0 <= m["win_rate"] <= 1.0 and 0.0 <= m["pref_accuracy"] <= 1.0 and 0.0 <= m["token_fraction"] <= 1.0
    sel = results["selection"]
    for f in ("precision", "recall", "random_precision", "random_recall", "weak_precision", "weak_recall"):
        assert 0.0 <= sel[f] <= 1.0, f
    for png in ("reward_vs_kl.png", "concentration.png", "token_rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and "precision" in table
    # the header names the k asked for and the share actually selected (per-response flooring lowers it)
    assert f"k = 30%; {sel['selected_fraction']:.1%} of tokens after flooring" in table


@pytest.mark.slow
def test_quick_demo_numbers_are_sane(demo):
    _, results = demo
    m = results["methods"]
    # the untrained model against itself: identical samples, no KL, trained on nothing
    assert (m["reference"]["win_rate"], m["reference"]["kl"], m["reference"]["token_fraction"]) == (0.5, 0.0, 0.0)
    # SePO and its control train on the same number of tokens, about k = 30% of them; DPO/SimPO on all
    assert m["sepo"]["token_fraction"] == pytest.approx(m["sepo_random"]["token_fraction"])
    assert 0.2 < m["sepo"]["token_fraction"] <= 0.3
    assert m["dpo"]["token_fraction"] == m["simpo"]["token_fraction"] == 1.0
    # every trained policy moved away from the reference
    assert all(m[k]["kl"] != 0.0 for k in ("dpo", "simpo", "sepo", "sepo_random", "sepo_weak"))
    assert results["weak_to_strong"]["weak_oracle_parameters"] < results["weak_to_strong"]["policy_parameters"]


@pytest.mark.slow
def test_rerunning_the_demo_resumes_without_redoing_stages(demo, capsys):
    out, results = demo
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["methods"] == results["methods"] and again["seconds"] < results["seconds"]
