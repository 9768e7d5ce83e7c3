"""`sepo sweep` end to end on a tiny task sweep: rows and outputs, `--jobs 2` equal to `--jobs 1`, and a sweep
killed mid-way resuming without recomputing its finished points. Plus the plan (axes, variants, errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sepo.config import from_dict
from sepo.errors import ConfigError
from sepo.io import lock_path
from sepo.stages.sweep import SweepConfig, plan

TINY = {
    "task": "sentiment", "num_prompts": 48, "eval_prompts": 16, "max_new_tokens": 10,
    "oracle": {"num_epochs": 1, "learning_rate": 1e-4, "batch_size": 8},
    "train": {"num_epochs": 1, "batch_size": 8},
    "methods": {"dpo": {"loss": "dpo", "learning_rate": [5e-5, 5e-4]},
                "sepo_random": {"loss": "sepo", "selection": "random", "learning_rate": [5e-5]}},
    "seeds": [0, 1], "bootstrap": 100, "threads": 1,
}
# what must match between two runs of the same sweep (times and output paths differ)
COMPARED = ("id", "method", "strength", "seed", "status", "token_fraction", "train_steps", "train_loss", "reward",
            "win_rate", "kl", "pref_accuracy", "distinct_2", "repeated_ngrams", "unknown_words", "samples")


def tiny(out: Path, **changes) -> SweepConfig:
    return from_dict(SweepConfig, {**TINY, "output": str(out), **changes})


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in rows]


@pytest.fixture(scope="module")
def one_job(tmp_path_factory):
    from sepo.stages.sweep import execute

    out = tmp_path_factory.mktemp("sweep") / "jobs1"
    return out, execute(tiny(out, jobs=1, contrasts=["* - dpo"]))


@pytest.mark.slow
def test_sweep_rows_summary_and_plot(one_job):
    out, result = one_job
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p.id for p in result.plan.points]
    assert len(rows) == 1 + 2 * 2 + 1 * 2  # reference + dpo 2 lrs x 2 seeds + sepo_random 1 lr x 2 seeds
    ref = rows[0]
    assert ref["method"] == "reference" and (ref["kl"], ref["win_rate"], ref["token_fraction"]) == (0.0, 0.5, 0.0)
    for r in rows[1:]:
        assert r["status"] == "ok" and r["train_steps"] >= 1 and len(r["samples"]) == 3
        assert r["config"]["train"]["seed"] == r["seed"] and r["config"]["train"]["learning_rate"] == \
            r["strength"]["learning_rate"]
        assert 0 < r["distinct_2"] <= 1 and 0 <= r["unknown_words"] < 1
    assert {r["token_fraction"] for r in rows if r["method"] == "dpo"} == {1.0}
    assert all(0.2 < r["token_fraction"] < 0.31 for r in rows if r["method"] == "sepo_random")
    # per-prompt values in every point's generations: what the bootstrap resamples
    gens = [json.loads(line) for line in (out / "points" / "dpo" / "learning_rate=0.0005" / "seed-1" / "eval" /
                                          "generations.jsonl").read_text().splitlines()]
    assert len(gens) == result.summary["frontier"]["num_prompts"] and all("kl" in g and "reward" in g for g in gens)
    # the trained weights are gone once evaluated (keep_policies: false)
    assert not (out / "points" / "dpo" / "learning_rate=0.0005" / "seed-1" / "policy").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["frontier"]["methods"]) == {"dpo", "sepo_random"}
    assert [v["budget"] for v in summary["frontier"]["verdicts"]] == [1.0, 3.0, 10.0]
    for m in summary["frontier"]["methods"].values():
        assert m["front"][0] == [0.0, summary["reference"]["reward"]]  # every front starts at the reference
        for at in m["at_budget"].values():
            assert at["low"] <= at["value"] <= at["high"]
    # the selections against the task's known key tokens, by polarity (sepo.tasks.quality)
    quality = summary["selection"]["oracle"]
    assert set(quality) == {"oracle", "random"}
    for report in quality.values():
        assert report["pairs"] > 0 and report["has_selection"]
        for side in ("chosen", "rejected"):
            assert 0 <= report[side]["every_token"]["auroc"] <= 1
    # the control keeps the oracle's token rewards (same AUROC) and only redraws which tokens are selected
    assert quality["random"]["chosen"]["every_token"]["auroc"] == quality["oracle"]["chosen"]["every_token"]["auroc"]
    assert quality["random"]["chosen"]["every_token"]["selected_tokens"] == \
        quality["oracle"]["chosen"]["every_token"]["selected_tokens"]
    # every pair's paired difference; the configured contrast, stored the other way round, negated
    from sepo.stages.sweep_report import contrast

    stored = summary["frontier"]["differences"]["dpo - sepo_random"]
    flipped = contrast(summary["frontier"], "sepo_random - dpo")
    for budget, d in stored.items():
        assert d["low"] <= d["value"] <= d["high"]
        assert flipped[budget] == {"value": -d["value"], "low": -d["high"], "high": -d["low"], "reached": d["reached"]}
    # the oracle's reward concentration (sepo inspect's measure), with a CI over responses
    conc = summary["concentration"]["variants"]["oracle"]
    assert conc["level"] == 0.8 and conc["responses"] > 0 and 0 < conc["low"] <= conc["mean"] <= conc["high"] <= 1
    assert summary["concentration"]["pooled"] == []  # one oracle: nothing to pool
    md = (out / "summary.md").read_text()
    assert "| KL ≤ 1 |" in md and "| dpo |" in md and "## Samples" in md and "## Selection quality" in md
    assert "| sepo_random - dpo |" in md and "## Reward concentration" in md
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not lock_path(out).exists()  # the run held the output's lock and released it


@pytest.mark.slow
def test_two_jobs_give_the_same_rows_as_one(one_job, tmp_path):
    from sepo.stages.sweep import execute

    _, result = one_job
    two = execute(tiny(tmp_path / "jobs2", jobs=2))
    assert comparable(two.rows) == comparable(result.rows)


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_recomputing_finished_points(one_job, tmp_path):
    """SIGKILL after 3 finished points (reference, then two of dpo); the rerun keeps those three untouched and
    ends with the rows of an uninterrupted sweep."""
    import yaml

    from sepo.stages.sweep import execute
    from sepo.stages.sweep_jobs import FAULT_ENV

    _, result = one_job
    out = tmp_path / "killed"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output": str(out), "jobs": 1}))
    env = {**os.environ, FAULT_ENV: "3", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "sepo", "sweep", str(config)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    finished = sorted(out.glob("points/**/result.json"))
    assert len(finished) == 3
    before = {p: (p.stat().st_mtime_ns, p.read_text()) for p in finished}
    assert not (out / "sweep.jsonl").exists()

    resumed = execute(tiny(out, jobs=1))
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in finished} == before
    for p in finished:  # each ran once: one "== point" header in its log
        assert (p.parent / "log.txt").read_text().count("== point ") == 1
    assert comparable(resumed.rows) == comparable(result.rows)


@pytest.mark.slow
def test_a_sweep_refuses_an_output_made_from_other_data(one_job):
    from sepo.stages.sweep import execute

    out, _ = one_job
    with pytest.raises(ConfigError, match="changed: num_prompts"):
        execute(tiny(out, num_prompts=50))


# --------------------------------------------------------------------------- the plan (nothing runs)


def test_plan_expands_strength_axes_seeds_and_swept_variants(tmp_path):
    """methods.sepo: learning_rate x 2 on variant `frac` (oracle_fraction x 2) -> two curves of 2 x 2 points."""
    cfg = tiny(tmp_path / "p", variants={"frac": {"oracle_fraction": [0.25, 0.5]}, "k": {"select": {
        "chosen_ratio": 0.1, "rejected_ratio": 0.1}}}, methods={
        "sepo": {"loss": "sepo", "variant": "frac", "learning_rate": [1e-5, 3e-5]},
        "sepo_k": {"loss": "sepo", "variant": "k", "gamma": [1.0, 2.0], "lora_target_modules": ["q_proj"]},
        "dpo": {"loss": "dpo"}})
    p = plan(cfg, tmp_path / "p")
    assert set(p.variants) == {"frac[oracle_fraction=0.25]", "frac[oracle_fraction=0.5]", "k"}
    assert p.variants["frac[oracle_fraction=0.25]"].pipeline.oracle_fraction == 0.25
    assert p.variants["k"].pipeline.select == {"chosen_ratio": 0.1, "rejected_ratio": 0.1}
    methods = {}
    for point in p.points:
        methods.setdefault(point.method, []).append((point.strength_label, point.seed))
    assert set(methods) == {"reference", "sepo[oracle_fraction=0.25]", "sepo[oracle_fraction=0.5]", "sepo_k", "dpo"}
    assert sorted(methods["sepo[oracle_fraction=0.25]"]) == [("learning_rate=1e-05", 0), ("learning_rate=1e-05", 1),
                                                            ("learning_rate=3e-05", 0), ("learning_rate=3e-05", 1)]
    assert methods["dpo"] == [("default", 0), ("default", 1)]
    k = [pt for pt in p.points if pt.method == "sepo_k"]
    assert {pt.train.gamma for pt in k} == {1.0, 2.0}
    assert all(pt.train.lora_target_modules == ["q_proj"] for pt in k)  # a list-typed key is a value, not an axis
    assert all(pt.train.data.endswith("variants/k/selected") for pt in k)
    assert [pt.seed for pt in p.points[1:]] == sorted(pt.seed for pt in p.points[1:])  # seed by seed


def test_a_task_with_oracle_options_selects_out_of_distribution(tmp_path):
    """noisy_chosen's oracles train on its clean pairs (task/oracle) and score, select and train on its own."""
    p = plan(tiny(tmp_path / "n", task="noisy_chosen"), tmp_path / "n")
    pipeline = p.variants["oracle"].pipeline
    assert pipeline.data == str(tmp_path / "n" / "task" / "oracle")
    assert pipeline.score_data == str(tmp_path / "n" / "base" / "data" / "train")
    dpo = next(pt for pt in p.points if pt.method == "dpo")
    assert dpo.train.data == str(tmp_path / "n" / "base" / "data" / "train")
    assert plan(tiny(tmp_path / "s"), tmp_path / "s").variants["oracle"].pipeline.score_data is None


def test_a_variant_may_set_its_own_seed_as_an_axis(tmp_path):
    """variants.seeds.seed = [1, 2]: two more oracles (their own subset, data order and random control); a
    variant without one keeps the sweep's seed, and the points' keys do not change."""
    cfg = tiny(tmp_path / "v", seed=5, variants={"oracle": {}, "seeds": {"seed": [1, 2]}})
    p = plan(cfg, tmp_path / "v")
    assert {n: v.pipeline.seed for n, v in p.variants.items()} == {"oracle": 5, "seeds[seed=1]": 1, "seeds[seed=2]": 2}
    before = plan(tiny(tmp_path / "v", seed=5), tmp_path / "v")
    assert [pt.key for pt in p.points] == [pt.key for pt in before.points]


def test_contrasts_name_methods_of_the_sweep(tmp_path):
    with pytest.raises(ConfigError, match="'sepo' is not a method of this sweep"):
        plan(tiny(tmp_path / "c", contrasts=["sepo - dpo"]), tmp_path / "c")
    with pytest.raises(ConfigError, match="must read 'A - B'"):
        plan(tiny(tmp_path / "c", contrasts=["dpo-sepo_random"]), tmp_path / "c")


def test_concentration_pools_the_oracles_that_differ_only_in_their_seed(tmp_path):
    """Per-response shares written by hand. oracle (the sweep's seed 0): chosen 0.2, 0.4, rejected 0.6 and one
    response without reward -> mean 0.4; seeds[seed=1]: 0.5 three times -> 0.5, CI [0.5, 0.5]; k (another
    selection): 0.3 -> not pooled. Pooled over the two oracles: (0.4 + 0.5) / 2 = 0.45."""
    from types import SimpleNamespace

    from sepo.stages.sweep_jobs import QUALITY_FILE
    from sepo.stages.sweep_report import concentration

    def variant(name, shares, **settings):
        folder = tmp_path / name
        folder.mkdir()
        summary = {"level": 0.8, "shares": shares, "responses": {"responses": 4, "tokens_for_level_median": 0.4,
                                                                 "tokens_for_level_on_mean_curve": 0.41},
                   "chosen": {"tokens_for_level_mean": 0.3}, "rejected": {"tokens_for_level_mean": 0.6}}
        (folder / QUALITY_FILE).write_text(json.dumps({"concentration": summary}))
        base = {"oracle_fraction": 0.5, "oracle": {}, "score": {}, "select": {"chosen_ratio": 0.3}}
        return name, SimpleNamespace(folder=folder, settings={"configured": name.split("[")[0], "axes": {},
                                                              **base, **settings})

    plan_ = SimpleNamespace(variants=dict([
        variant("oracle", {"chosen": [0.2, 0.4], "rejected": [0.6, None]}),
        variant("seeds[seed=1]", {"chosen": [0.5, 0.5], "rejected": [0.5]}, seed=1),
        variant("k", {"chosen": [0.3], "rejected": [0.3]}, select={"chosen_ratio": 0.1})]))
    conc = concentration(plan_, seed=0, resamples=200)
    assert conc["variants"]["oracle"]["mean"] == pytest.approx(0.4)
    assert (conc["variants"]["seeds[seed=1]"]["low"], conc["variants"]["seeds[seed=1]"]["high"]) == \
        pytest.approx((0.5, 0.5))
    (pooled,) = conc["pooled"]
    assert pooled["variants"] == ["oracle", "seeds[seed=1]"] and pooled["seeds"] == [0, 1]
    assert pooled["mean"] == pytest.approx(0.45) and pooled["low"] <= 0.45 <= pooled["high"]


def test_plan_takes_axes_written_on_the_command_line(tmp_path):
    from sepo.config import load

    cfg = load(SweepConfig, None, [f"output={tmp_path / 'c'}", "task=sentiment", "methods.dpo.loss=dpo",
                                   "methods.dpo.learning_rate=[1e-5, 2e-5]", "seeds=0,1,2"])
    points = [pt for pt in plan(cfg, tmp_path / "c").points if pt.method == "dpo"]
    assert sorted({pt.train.learning_rate for pt in points}) == [1e-5, 2e-5] and len(points) == 6


@pytest.mark.parametrize(("changes", "message"), [
    ({"methods": {"dpo": {"loss": "dpo", "variant": "oracle"}}}, "has no effect: selection none"),
    ({"methods": {"s": {"loss": "sepo", "variant": "nope"}}}, "the variants are oracle"),
    ({"methods": {"s": {"loss": "sepo", "seed": 3}}}, "set by the sweep"),
    ({"methods": {"reference": {"loss": "dpo"}}}, "names the untrained policy"),
    ({"methods": {"s": {"loss": "sepo", "learning_rat": [1e-5]}}}, "did you mean methods.s.learning_rate"),
    ({"variants": {"weak": {"sft": {"num_epochs": 1}}}}, "set variants.weak.reference too"),
    ({"variants": {"v": {"oracle": {"learning_rate": []}}}}, "empty list"),
    ({"task_options": {"temperature_x": 1}}, "not an option of task sentiment"),
    ({"data": "somewhere"}, "exactly one of task"),
    ({"budgets": [0, 1]}, "budgets"),
    ({"contrasts": ["* - dpoo"]}, "'dpoo' is not a method of this sweep"),
    ({"contrasts": ["* - *"]}, "at most one side"),
])
def test_plan_errors_are_clear(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        plan(tiny(tmp_path / "e", **changes), tmp_path / "e")


def test_a_selection_report_from_an_older_sepo_is_recomputed_on_resume(tmp_path):
    """A variant folder whose selection_quality.json lacks the reward concentration (written before it existed)
    is not current: the resumed sweep reruns the variant's job, which recomputes it from the stored selections."""
    from types import SimpleNamespace

    from sepo.stages.sweep_jobs import QUALITY_FILE, quality_is_current

    variant = SimpleNamespace(folder=tmp_path)
    assert not quality_is_current(variant)
    (tmp_path / QUALITY_FILE).write_text(json.dumps({"variant": "oracle", "reports": {}}))
    assert not quality_is_current(variant)
    (tmp_path / QUALITY_FILE).write_text(json.dumps({"variant": "oracle", "reports": {}, "concentration": {}}))
    assert quality_is_current(variant)
