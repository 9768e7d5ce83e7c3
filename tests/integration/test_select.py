"""`sepo select`: masks aligned with the ids, statistics, edge ratios, cross-tokenizer output."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_story_pairs_dataset
from sepo.cli import main
from sepo.core.selection import magnitude_quantile, select, soft_weights
from sepo.io import load_dataset_dir, save_dataset
from sepo.models import load_tokenizer, tokenizer_fingerprint
from sepo.stages import score
from sepo.stages import select as select_stage
from sepo.stages.select import SelectConfig


@pytest.fixture(scope="module")
def scores_dir(tmp_path_factory, stories260k, tiny_llama_stories):
    root = tmp_path_factory.mktemp("select")
    tok = AutoTokenizer.from_pretrained(str(stories260k))
    save_dataset(make_story_pairs_dataset(tok, n=9), root / "pairs", {"stage": "data"})
    score.run(score.ScoreConfig(oracle=str(stories260k), reference=str(tiny_llama_stories), data=str(root / "pairs"),
                                output=str(root / "scores")))
    return root / "scores"


@pytest.mark.parametrize("strategy,value", [("ratio", 0.3), ("threshold", 0.2), ("mass", 0.5)])
def test_masks_equal_the_core_rule_row_by_row(tmp_path, scores_dir, strategy, value):
    meta = select_stage.run(SelectConfig(scores=str(scores_dir), output=str(tmp_path / "sel"), strategy=strategy,
                                         chosen_ratio=value, rejected_ratio=value, threshold=value, mass=value,
                                         batch_rows=4))  # several length-sorted batches
    ds, saved = load_dataset_dir(tmp_path / "sel", ["chosen_mask", "rejected_mask"])
    assert saved["stage"] == "select" and saved["stats"]["strategy"] == strategy
    total = 0
    for row in ds:
        for side in ("chosen", "rejected"):
            r = torch.tensor([row[f"{side}_rewards"]])
            assert len(row[f"{side}_mask"]) == len(row[f"{side}_input_ids"])
            expected = select(r, torch.ones_like(r, dtype=torch.bool), strategy, value, side)[0].tolist()
            assert row[f"{side}_mask"] == expected
            assert row[f"{side}_weights"] == [float(x) for x in expected]  # weighting hard: the mask as 0/1
            total += sum(expected)
    assert meta["stats"]["chosen"]["selected"] + meta["stats"]["rejected"]["selected"] == total


@pytest.mark.parametrize("weighting", ["clip", "softmax"])
def test_soft_weights_equal_the_core_rule_row_by_row(tmp_path, scores_dir, weighting):
    """The weights columns hold soft_weights with tau_w = the weight_quantile of |r|; the masks are still the
    strategy's; selecting a selected folder again replaces both."""
    meta = select_stage.run(SelectConfig(scores=str(scores_dir), output=str(tmp_path / "soft"), weighting=weighting,
                                         weight_quantile=0.8, batch_rows=4))
    ds, _ = load_dataset_dir(tmp_path / "soft", ["chosen_weights", "rejected_weights"])
    every = torch.tensor([v for col in ("chosen_rewards", "rejected_rewards") for row in ds[col] for v in row])
    tau_w = magnitude_quantile(every, 0.8)
    assert meta["stats"]["weight_scale"] == pytest.approx(tau_w) and meta["stats"]["weighting"] == weighting
    total = {"chosen": 0.0, "rejected": 0.0}
    for row in ds:
        for side in ("chosen", "rejected"):
            r = torch.tensor([row[f"{side}_rewards"]])
            expected = soft_weights(r, torch.ones_like(r, dtype=torch.bool), weighting, tau_w, side)[0]
            torch.testing.assert_close(torch.tensor(row[f"{side}_weights"]), expected)
            assert row[f"{side}_mask"] == select(r, torch.ones_like(r, dtype=torch.bool), "ratio", 0.3, side)[0].tolist()
            total[side] += float(expected.sum())
    for side in ("chosen", "rejected"):
        tokens = meta["stats"][side]["tokens"]
        assert meta["stats"][side]["mean_weight"] == pytest.approx(total[side] / tokens, rel=1e-5)
    again = select_stage.run(SelectConfig(scores=str(tmp_path / "soft"), output=str(tmp_path / "hard")))
    hard, _ = load_dataset_dir(tmp_path / "hard")
    assert again["stats"]["weighting"] == "hard"
    assert all(w == [float(m) for m in mask] for w, mask in zip(hard["chosen_weights"], hard["chosen_mask"]))


def test_ratio_zero_one_and_threshold_quantile(tmp_path, scores_dir):
    none = select_stage.run(SelectConfig(scores=str(scores_dir), output=str(tmp_path / "zero"), chosen_ratio=0.0,
                                         rejected_ratio=1.0))
    ds, _ = load_dataset_dir(tmp_path / "zero")
    assert not any(any(m) for m in ds["chosen_mask"]) and all(all(m) for m in ds["rejected_mask"])
    assert none["stats"]["chosen"]["empty_selections"] == len(ds) and none["stats"]["rejected"]["empty_selections"] == 0
    q = select_stage.run(SelectConfig(scores=str(scores_dir), output=str(tmp_path / "q"), strategy="threshold",
                                      threshold_quantile=0.5))
    every = torch.tensor([abs(v) for col in ("chosen_rewards", "rejected_rewards") for row in ds[col] for v in row])
    assert q["stats"]["tau"] == pytest.approx(torch.quantile(every.double(), 0.5).item(), rel=1e-6)


def test_cross_tokenizer_selection_writes_policy_ids_and_conserves_reward(tmp_path, scores_dir, gpt2_tokenizer_path):
    rc = main(["select", "--scores", str(scores_dir), "--output", str(tmp_path / "gpt2"),
               "--policy-tokenizer", str(gpt2_tokenizer_path), "--chosen-ratio", "0.5"])
    assert rc == 0
    scored, _ = load_dataset_dir(scores_dir)
    ds, meta = load_dataset_dir(tmp_path / "gpt2")
    gpt2 = load_tokenizer(str(gpt2_tokenizer_path))
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(gpt2) != meta["scoring_tokenizer_fingerprint"]
    for before, after in zip(scored, ds):
        assert after["prompt_input_ids"] == gpt2(before["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            ids = after[f"{side}_input_ids"]
            assert ids[-1] == gpt2.eos_token_id and gpt2.decode(ids[:-1]) == before[side]
            assert len(after[f"{side}_rewards"]) == len(ids) == len(after[f"{side}_mask"])
            assert sum(after[f"{side}_rewards"]) == pytest.approx(sum(before[f"{side}_rewards"]), abs=1e-4)
        assert sum(after["chosen_mask"]) == max(1, len(after["chosen_input_ids"]) // 2)


def test_bad_config_is_one_message(tmp_path, capsys, scores_dir):
    assert main(["select", "--scores", str(scores_dir), "--output", str(tmp_path / "x"), "--chosen-ratio", "1.5"]) == 2
    assert "chosen_ratio must be a fraction in [0, 1] (0.3 means 30%)" in capsys.readouterr().err
    assert main(["select", "--scores", str(scores_dir), "--output", str(tmp_path / "z"), "--weighting", "clip",
                 "--weight-scale", "0"]) == 2
    assert "weight_scale must be > 0" in capsys.readouterr().err
    assert main(["select", "--scores", str(tmp_path / "absent"), "--output", str(tmp_path / "y")]) == 2


def test_cross_tokenizer_on_raw_data_with_awkward_text(tmp_path, stories260k, tiny_llama_stories, gpt2_tokenizer_path):
    """Responses tokenized by the data layer in their prompt's context, with newlines, runs of spaces and
    non-ASCII characters: each response's total reward still survives the projection to GPT-2 tokens."""
    import json

    rows = [("Human: hi\n\nAssistant:", " Hello!\nHow  are you?", " Go away."),
            ("Say something nice.", "  Café, naïve — ok 😀", "no"),
            ("Count:", " 1, 2, 3\n\n4", " 12345678")]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    score.run(score.ScoreConfig(oracle=str(stories260k), reference=str(tiny_llama_stories), data=str(raw),
                                output=str(tmp_path / "scores")))
    select_stage.run(SelectConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "gpt2"),
                                  policy_tokenizer=str(gpt2_tokenizer_path), strategy="mass"))
    scored, _ = load_dataset_dir(tmp_path / "scores")
    ds, _ = load_dataset_dir(tmp_path / "gpt2")
    for before, after in zip(scored, ds):
        for side in ("chosen", "rejected"):
            assert sum(after[f"{side}_rewards"]) == pytest.approx(sum(before[f"{side}_rewards"]), abs=1e-4)
            assert after[f"{side}_input_ids"][-1] == 50256 and len(after[f"{side}_mask"]) == len(after[f"{side}_input_ids"])


def test_projection_falls_back_to_decoded_pieces_for_context_tokenized_ids(gpt2_tokenizer_path):
    """Stored ids '▁', 's', 'm', 'il', 'ed' spell " smiled" but are not its standalone tokenization
    ('▁s', 'm', 'il', 'ed'): spans come from the decoded pieces and the reward is still conserved."""
    import datasets

    from sepo.stages.select import project_to_policy

    oracle, gpt2 = load_tokenizer("stories260k"), load_tokenizer(str(gpt2_tokenizer_path))
    ids = [*oracle.convert_tokens_to_ids(["▁", "s", "m", "il", "ed"]), oracle.eos_token_id]
    assert ids[:-1] != oracle(" smiled", add_special_tokens=False)["input_ids"]
    rewards = [0.5, 1.0, -2.0, 0.25, 4.0, -1.0]
    ds = datasets.Dataset.from_dict({"index": [0], "prompt": ["She"], "chosen": [" smiled"], "rejected": [" smiled"],
                                     "prompt_input_ids": [[1]], "chosen_input_ids": [ids], "rejected_input_ids": [ids],
                                     "chosen_rewards": [rewards], "rejected_rewards": [rewards]})
    out = project_to_policy(ds, oracle, gpt2)
    assert out["chosen_input_ids"][0] == [*gpt2(" smiled", add_special_tokens=False)["input_ids"], gpt2.eos_token_id]
    assert sum(out["chosen_rewards"][0]) == pytest.approx(sum(rewards), abs=1e-5)
    assert out["chosen_rewards"][0][-1] == pytest.approx(-1.0)  # EOS -> EOS


def test_rewards_that_do_not_line_up_with_the_ids_are_refused(tmp_path, capsys, scores_dir):
    """A folder whose reward lists were cut or re-tokenized used to be selected silently, with the masks
    attached to the wrong tokens."""
    ds, meta = load_dataset_dir(scores_dir)
    ds = ds.map(lambda row, i: {"rejected_rewards": row["rejected_rewards"][:-1] if i == 2 else row["rejected_rewards"]},
                with_indices=True)
    save_dataset(ds, tmp_path / "bad", meta)
    for command in ("select", "inspect"):
        assert main([command, "--scores", str(tmp_path / "bad"), "--output", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err
        assert "row 3, field 'rejected_rewards'" in err and "Traceback" not in err
        assert not (tmp_path / command).exists()


def test_a_slow_policy_tokenizer_is_refused_by_name(tmp_path, capsys, scores_dir, stories260k):
    """A slow tokenizer silently returns no offset mapping; the projection needs one."""
    from transformers import SentencePieceBackend

    slow = SentencePieceBackend(vocab_file=str(stories260k / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")
    slow.save_pretrained(tmp_path / "slow")
    assert not load_tokenizer(str(tmp_path / "slow")).is_fast
    rc = main(["select", "--scores", str(scores_dir), "--output", str(tmp_path / "sel"), "--policy-tokenizer",
               str(tmp_path / "slow")])
    err = capsys.readouterr().err
    assert rc == 2 and f"the policy tokenizer {tmp_path / 'slow'} (SentencePieceBackend) is not a fast tokenizer" in err
    assert not (tmp_path / "sel").exists()
