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


@pytest.mark.parametrize("task", ["minimal_pairs", "noisy_chosen"])
@pytest.mark.parametrize("quick", [False, True])
def test_every_task_plugs_into_the_demo_with_its_own_sizes(task, quick, tmp_path, monkeypatch):
    """`sepo demo --task NAME [--quick]`: the task's own sizes and learning rates, its own output folder, every
    point's config built; noisy_chosen's oracles (the strong one and the weak one, with its SFT) train on the
    clean pairs of its oracle_options while every method trains on the noisy ones."""
    from sepo.stages.demo import QUICK_LR_SCALE, TASK_LEARNING_RATES, TASK_SIZES, DemoConfig, sweep_config
    from sepo.stages.sweep import plan

    monkeypatch.chdir(tmp_path)
    cfg = DemoConfig(task=task, quick=quick)
    sizes = TASK_SIZES[task]["quick" if quick else "full"]
    assert {k: getattr(cfg, k) for k in sizes} == sizes
    assert cfg.output == ("runs/demo-quick-" if quick else "runs/demo-") + task
    lrs = TASK_LEARNING_RATES[task]
    scale = QUICK_LR_SCALE.get(task, 1.0)  # --quick: the lowest and highest rates, scaled for its fewer pairs
    assert cfg.learning_rates == ({m: [v[0] * scale, v[-1] * scale] for m, v in lrs.items()} if quick else lrs)
    p = plan(sweep_config(cfg), tmp_path / cfg.output)
    assert {pt.method for pt in p.points} == {"reference", *METHODS}
    assert {pt.eval.max_new_tokens for pt in p.points} == {sizes["max_new_tokens"]}
    task_dir = tmp_path / cfg.output / "task"
    expected = str(task_dir / "oracle") if task == "noisy_chosen" else str(tmp_path / cfg.output / "base" / "data" / "train")
    assert {v.pipeline.data for v in p.variants.values()} == {expected}
    assert "sft" in p.variants["weak"].pipeline.stages  # the weak model's SFT reads the same (clean) pairs
    for method in ("dpo", "simpo"):
        point = next(pt for pt in p.points if pt.method == method)
        assert point.train.data == str(tmp_path / cfg.output / "base" / "data" / "train")  # the task's own pairs


@pytest.mark.slow
def test_a_tiny_noisy_chosen_demo_runs_end_to_end(tmp_path):
    """The demo on noisy_chosen, as small as it runs: the junk is scored as tokens to avoid, the oracle's clean
    data reaches it, and the report holds the concentration of its token rewards."""
    out = tmp_path / "nc"
    lrs = ["learning_rates.dpo=[1e-4]", "learning_rates.simpo=[1e-4]", "learning_rates.sepo=[2e-5]",
           "learning_rates.sepo_random=[1e-4]"]
    assert main(["demo", "--task", "noisy_chosen", "--output", str(out), "num_prompts=40", "eval_prompts=8",
                 "max_new_tokens=24", "seeds=0", "weak_to_strong=false", "jobs=1", *lrs]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]["frontier"]["methods"]) == {"dpo", "simpo", "sepo", "sepo_random"}
    from sepo.io import load_dataset_dir

    clean = load_dataset_dir(out / "variants" / "oracle" / "data" / "train")[0]  # what the oracle trained on
    noisy = load_dataset_dir(out / "variants" / "oracle" / "data" / "score")[0]  # what it scored and selected
    assert not any(clean["chosen_junk_spans"]) and any(noisy["chosen_junk_spans"])
    avoid = results["summary"]["selection"]["oracle"]["oracle"]["chosen"]["avoid"]
    assert 0 < avoid["avoid_fraction"] < 1 and 0 <= avoid["share"] <= 1 and avoid["base_rate"] > 0
    assert "avoid" not in results["summary"]["selection"]["oracle"]["oracle"]["rejected"]
    assert 0 < results["summary"]["concentration"]["variants"]["oracle"]["mean"] <= 1
    table = (out / "results.md").read_text()
    assert "# sepo demo (noisy_chosen)" in table and "Tokens to avoid" in table and "## Reward concentration" in table
