"""`sepo pipeline`: every stage in its own folder, results.json / results.md, and resume after a crash."""

from __future__ import annotations

import json

import pytest

from sepo.io import load_dataset_dir, save_dataset
from sepo.stages import pipeline
from sepo.stages.pipeline import PipelineConfig

TRAIN = {"max_steps": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def task_pairs(tmp_path_factory):
    """Labelled pairs of the embedded task: two stories260K samples per prompt."""
    import warnings

    from sepo.models import load_causal_lm, load_tokenizer
    from sepo.tasks.sentiment import make_preference_pairs, story_prompts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = load_tokenizer("stories260k")
    model = load_causal_lm("stories260k", trainable=False)
    root = tmp_path_factory.mktemp("task")
    prompts = story_prompts(40, seed=0)
    train = make_preference_pairs(model, tok, prompts[:32], max_new_tokens=12, seed=0)
    held_out = make_preference_pairs(model, tok, prompts[32:], max_new_tokens=12, seed=1)
    return (save_dataset(train, root / "train", {"stage": "test", "num_rows": len(train)}),
            save_dataset(held_out, root / "eval", {"stage": "test", "num_rows": len(held_out)}))


def config(tmp_path, task_pairs, **kw) -> PipelineConfig:
    train, held_out = task_pairs
    values = {"output": str(tmp_path / "run"), "data": str(train), "eval_data": str(held_out),
              "methods": {"sepo": {"loss": "sepo"}, "sepo_random": {"loss": "sepo", "selection": "random"},
                          "dpo": {"loss": "dpo"}, "sepo_kl": {"loss": "sepo_kl", "anchor_weight": 0.5}},
              "reward": "sepo.tasks.sentiment:gold_reward_batch", "oracle": dict(TRAIN), "train": dict(TRAIN),
              "eval": {"max_new_tokens": 6, "num_prompts": 4}, **kw}
    from sepo.config import from_dict

    return from_dict(PipelineConfig, values)


def test_pipeline_runs_every_stage_and_resumes_after_a_crash(tmp_path, task_pairs, monkeypatch):
    import sepo.stages.select as select_stage

    def crash(cfg):
        raise RuntimeError("killed during select")

    monkeypatch.setattr(select_stage, "run", crash)
    with pytest.raises(RuntimeError, match="killed during select"):
        pipeline.run(config(tmp_path, task_pairs))
    run = tmp_path / "run"
    assert (run / "oracle.done.json").is_file() and (run / "scores.done.json").is_file()
    assert not (run / "selected").exists() and not (run / "results.json").exists()
    oracle_mtime = (run / "oracle" / "config.json").stat().st_mtime
    monkeypatch.undo()

    results = pipeline.run(config(tmp_path, task_pairs))
    assert results["stages_skipped"] == ["data", "oracle", "score"]  # finished stages are not redone
    assert "select" in results["stages_run"] and "train:sepo" in results["stages_run"]
    assert (run / "oracle" / "config.json").stat().st_mtime == oracle_mtime
    assert set(results["methods"]) == {"reference", "sepo", "sepo_random", "dpo", "sepo_kl"}
    for m in results["methods"].values():
        assert {"gold_reward", "win_rate", "kl", "pref_accuracy", "token_fraction"} <= set(m)
    ref = results["methods"]["reference"]
    assert (ref["win_rate"], ref["kl"], ref["token_fraction"]) == (0.5, 0.0, 0.0)
    assert results["methods"]["dpo"]["token_fraction"] == 1.0
    assert 0 < results["methods"]["sepo"]["token_fraction"] < 0.5
    assert results["methods"]["sepo_random"]["token_fraction"] == results["methods"]["sepo"]["token_fraction"]
    assert results["methods"]["dpo"]["pref_metric"] == "implicit" and results["methods"]["sepo"]["pref_metric"] == "logprob"
    # a token-level loss that reads the selection trains on it without being told (and is compared with the reference)
    assert results["methods"]["sepo_kl"]["selection"] == "oracle" and results["methods"]["sepo_kl"]["pref_metric"] == \
        "implicit"
    assert json.loads((run / "policy-sepo_kl" / "sepo_metadata.json").read_text())["source"] == str(run / "selected")
    assert json.loads((run / "results.json").read_text())["methods"] == results["methods"]
    assert "| sepo_random |" in (run / "results.md").read_text()

    # the control keeps the oracle's count per response, at other positions
    sel, _ = load_dataset_dir(run / "selected")
    rnd, _ = load_dataset_dir(run / "selected-random")
    assert [sum(m) for m in sel["chosen_mask"]] == [sum(m) for m in rnd["chosen_mask"]]
    assert sel["chosen_mask"] != rnd["chosen_mask"]

    again = pipeline.run(config(tmp_path, task_pairs))  # everything complete: nothing runs
    assert again["stages_run"] == [] and again["methods"] == results["methods"]

    # changed eval settings: only the evals run again
    changed = pipeline.run(config(tmp_path, task_pairs, eval={"max_new_tokens": 5, "num_prompts": 4}))
    assert changed["stages_run"] == ["eval:reference", "eval:sepo", "eval:sepo_random", "eval:dpo", "eval:sepo_kl"]


def test_a_method_trains_on_the_selected_folder_when_its_loss_reads_a_selection_or_token_rewards(tmp_path, task_pairs):
    specs = pipeline.method_specs(config(tmp_path, task_pairs, methods={
        name: {} for name in ("sepo", "sepo_dpo", "sepo_nll", "tgdpo", "dpo", "sdpo", "sparsepo", "tdpo")}))
    assert {name: m["selection"] for name, m in specs.items()} == {
        "sepo": "oracle", "sepo_dpo": "oracle", "sepo_nll": "oracle", "tgdpo": "oracle", "dpo": "none", "sdpo": "none",
        "sparsepo": "none", "tdpo": "none"}


def test_a_changed_stage_reruns_everything_downstream_of_it(tmp_path):
    """The stage runner alone (no models): oracle -> score -> select, and an unrelated method."""
    from sepo.stages.pipeline import StageRunner

    calls = []

    def run_all(oracle_lr: float, method_lr: float) -> list[str]:
        step = StageRunner(tmp_path, rerun=[])
        for key, settings, after in (("oracle", {"lr": oracle_lr}, ()), ("score", {}, ("oracle",)),
                                     ("select", {}, ("score",)), ("train:dpo", {"lr": method_lr}, ())):
            folder = tmp_path / key.replace(":", "-")
            step(key, folder, settings, lambda f=folder: (f.mkdir(exist_ok=True), calls.append(f.name)), after=after)
        return step.ran

    assert run_all(1e-4, 1e-5) == ["oracle", "score", "select", "train:dpo"]
    assert run_all(1e-4, 1e-5) == []
    assert run_all(2e-4, 1e-5) == ["oracle", "score", "select"]  # the method did not depend on the oracle
    assert run_all(2e-4, 3e-5) == ["train:dpo"]


def test_a_stage_whose_input_no_stage_makes_fails_before_anything_runs(tmp_path, task_pairs):
    from sepo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage train \(sepo\) reads .*selected, which stage select makes.*Add "
                                          r"'select'"):
        pipeline.run(config(tmp_path, task_pairs, stages=["train", "eval"]))
    with pytest.raises(ConfigError, match=r"stage eval \(sepo\) reads .*policy-sepo, which stage train makes"):
        pipeline.run(config(tmp_path, task_pairs, stages=["eval"]))
    assert not (tmp_path / "run").exists()  # not even the data stage ran


def test_a_misspelt_section_key_is_reported_in_its_section(tmp_path, task_pairs):
    from sepo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^train\.learning_rat is not a `sepo train` key; did you mean "
                                          r"train\.learning_rate\?"):
        pipeline.run(config(tmp_path, task_pairs, train={"learning_rat": 1e-4}))
    with pytest.raises(ConfigError, match=r"^methods\.dpo\.bta is not a `sepo train` key; did you mean methods\.dpo\.beta"):
        pipeline.run(config(tmp_path, task_pairs, methods={"dpo": {"loss": "dpo", "bta": 0.2}}))
    with pytest.raises(ConfigError, match=r"^eval\.temprature is not a `sepo eval` key"):
        pipeline.run(config(tmp_path, task_pairs, eval={"temprature": 0.5}))
    assert not (tmp_path / "run").exists()


def test_random_control_moves_the_weights_with_the_positions():
    """The random control keeps each response's number of selected tokens, and its weights travel with the
    positions: the drawn positions carry the selected tokens' weights, the rest the unselected ones'."""
    import datasets

    selected = datasets.Dataset.from_dict({
        "chosen_mask": [[True, False, False, True, False], [False, True]],
        "rejected_mask": [[False, False, True], [True]],
        "chosen_weights": [[0.9, 0.1, 0.0, 0.7, 0.2], [0.3, 1.0]],
        "rejected_weights": [[0.0, 0.4, 1.0], [1.0]]})
    control = pipeline.random_masks_like(selected, seed=3)
    for before, after in zip(selected, control):
        for side in ("chosen", "rejected"):
            mask, weights = after[f"{side}_mask"], after[f"{side}_weights"]
            assert sum(mask) == sum(before[f"{side}_mask"])
            picked = sorted(w for w, m in zip(weights, mask) if m)
            assert picked == pytest.approx(sorted(w for w, m in zip(before[f"{side}_weights"], before[f"{side}_mask"]) if m))
            assert sorted(weights) == pytest.approx(sorted(before[f"{side}_weights"]))
    assert pipeline.random_masks_like(selected.remove_columns(["chosen_weights", "rejected_weights"]),
                                      seed=3)["chosen_mask"] == control["chosen_mask"]  # same draw with or without
