"""`sepo eval` end to end: outputs, AlpacaEval schema, KL/win rate of a model against itself, errors."""

from __future__ import annotations

import json

import pytest

from sepo.cli import main
from sepo.io import save_dataset


@pytest.fixture
def pairs_dir(tmp_path, story_pairs):
    return save_dataset(story_pairs, tmp_path / "pairs", {"stage": "data", "num_rows": len(story_pairs)})


def test_eval_writes_metrics_generations_and_alpacaeval(tmp_path, pairs_dir, tiny_llama_stories):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", "stories260k", "--reference", str(tiny_llama_stories), "--data", str(pairs_dir),
               "--reward", "sepo.tasks.sentiment:gold_reward_batch", "--output", str(out), "--max-new-tokens", "8",
               "--generator-name", "stories", "--num-prompts", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pref_metric"] == "implicit" and metrics["num_pairs"] == 6 and metrics["num_prompts"] == 4
    assert 0.0 <= metrics["pref_accuracy"] <= 1.0 and 0.0 <= metrics["win_rate"] <= 1.0
    assert metrics["kl"] > 0  # samples of the trained model are far likelier under it than under a random model
    alpaca = json.loads((out / "alpaca_eval.json").read_text())
    assert len(alpaca) == 4
    assert all(set(r) == {"instruction", "output", "generator"} and r["generator"] == "stories" for r in alpaca)
    assert all(isinstance(r["instruction"], str) and isinstance(r["output"], str) for r in alpaca)
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["output"] for g in gens] == [r["output"] for r in alpaca]
    assert {"reward", "reference_output", "reference_reward", "kl"} <= set(gens[0])
    # per-prompt values whose means are the metrics (the sweep's bootstrap resamples them)
    assert metrics["reward"] == pytest.approx(sum(g["reward"] for g in gens) / 4)
    assert metrics["kl"] == pytest.approx(sum(g["kl"] for g in gens) / 4)
    assert 0 < metrics["distinct_2"] <= 1 and 0 <= metrics["repeated_ngrams"] < 1
    assert 0 <= metrics["unknown_words"] < 1 and metrics["replacement_chars"] == 0.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left behind


def test_eval_of_a_model_against_itself(tmp_path, pairs_dir):
    """Same weights, same seed: identical samples -> win rate 1/2 exactly, KL 0 exactly, implicit accuracy 1/2."""
    from sepo.stages.evaluate import EvalConfig, run

    m = run(EvalConfig(model="stories260k", reference="stories260k", data=str(pairs_dir), output=str(tmp_path / "e"),
                       reward="sepo.tasks.sentiment:gold_reward_batch", max_new_tokens=8))
    assert (m["win_rate"], m["kl"], m["pref_accuracy"], m["pref_margin"]) == (0.5, 0.0, 0.5, 0.0)
    free = run(EvalConfig(model="stories260k", data=str(pairs_dir), output=str(tmp_path / "f"), num_prompts=0))
    assert free["pref_metric"] == "logprob" and "kl" not in free and "win_rate" not in free


def test_eval_errors_are_clear(tmp_path, pairs_dir, capsys):
    out = tmp_path / "e"
    out.mkdir()
    assert main(["eval", "--model", "stories260k", "--data", str(pairs_dir), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", "--model", "stories260k", "accuracy_metric=implicit"]) == 2
    assert "needs a reference" in capsys.readouterr().err
    assert main(["eval", "--model", "stories260k", "--data", str(pairs_dir), "--output", str(tmp_path / "x"),
                 "--reward", "no_such_module:f"]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["eval", "--model", "stories260k", "--output", str(tmp_path / "y")]) == 2  # nothing to evaluate on
    assert "--data" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_a_bad_reward_fails_before_any_evaluation(tmp_path, pairs_dir, monkeypatch):
    import sepo.stages.evaluate as evaluate
    from sepo.errors import SepoError

    def too_late(*args, **kwargs):
        raise AssertionError("the reward should have been checked before the accuracy pass")

    monkeypatch.setattr(evaluate, "preference_accuracy", too_late)
    with pytest.raises(SepoError, match="is not callable"):
        evaluate.run(evaluate.EvalConfig(model="stories260k", data=str(pairs_dir), output=str(tmp_path / "e"),
                                         reward="sepo.tasks.sentiment:POSITIVE_WORDS"))
