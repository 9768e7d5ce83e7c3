"""The noisy-chosen task: the chosen response wins on the gold reward in spite of junk that the gold reward charges."""

from __future__ import annotations

import pytest

from sepo.errors import ConfigError
from sepo.models import load_causal_lm, load_tokenizer
from sepo.tasks import get_task
from sepo.tasks import minimal_pairs as mp
from sepo.tasks import noisy_chosen as nc
from sepo.tasks.sentiment import NEGATIVE_WORDS, REPETITION_WEIGHT, story_prompts, words


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("stories260k")


@pytest.fixture(scope="module")
def model():
    return load_causal_lm("stories260k", trainable=False)


@pytest.fixture(scope="module")
def noisy(model, tok):
    return nc.make_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=40, seed=0)


@pytest.fixture(scope="module")
def clean(model, tok):
    return nc.make_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=40, seed=0, noise_share=0.0)


def test_gold_reward_hand_computed():
    """"Everyone felt happy. <br> &nbsp; It was a long day.": 1 positive word; 10 words ("br" and "nbsp" count)
    -> 8 distinct trigrams, no repetition; 10 chunks, 2 holding a junk character -> 1 - 10 * 0.2 = -1.
    "Tom ran to the park. Tom ran to the park. Everyone felt glad.": +1; 13 words, 11 trigrams of which 3 repeat
    an earlier one (tom ran to, ran to the, to the park) -> repetition 3/11; 1 - 2 * 3/11.
    "It was so sad. They were all lost.": -2, no repetition, no garble.
    "He ran \ufffd\ufffd home fast.": 4 words, nothing else; 5 chunks, 1 of replacement characters (what undecodable
    byte tokens decode to) -> 0 - 10 * 0.2 = -2."""
    assert nc.gold_reward("Everyone felt happy. <br> &nbsp; It was a long day.") == pytest.approx(-1.0)
    assert nc.gold_reward("Tom ran to the park. Tom ran to the park. Everyone felt glad.") == pytest.approx(
        1 - REPETITION_WEIGHT * 3 / 11)
    assert nc.gold_reward("It was so sad. They were all lost.") == -2.0
    assert nc.gold_reward("He ran \ufffd\ufffd home fast.") == pytest.approx(-2.0)
    assert nc.garbled_share("a <b> c {{ x}} ok") == pytest.approx(3 / 6)
    assert nc.gold_reward_batch(["p", "q"], ["Everyone felt happy today.", "@@ ## It was a day."]) == [
        1.0, pytest.approx(-10 * 2 / 6)]
    with pytest.raises(ValueError):
        nc.gold_reward_batch(["p"], [])


def test_chosen_wins_in_spite_of_its_junk(noisy):
    assert len(noisy) == 24
    assert all(c > r for c, r in zip(noisy["chosen_gold"], noisy["rejected_gold"]))
    assert all(row["chosen_junk_spans"] for row in noisy)  # noise_share 1: every chosen response carries junk
    assert not any(row["rejected_junk_spans"] for row in noisy)
    for row in noisy:
        assert row["chosen_gold"] == pytest.approx(nc.gold_reward(row["chosen"]), abs=1e-6)


def test_junk_is_what_the_spans_say_and_never_overlaps_the_edits(noisy):
    kinds = set()
    for row in noisy:
        text = row["chosen"]
        for s, e in row["chosen_junk_spans"]:
            piece = text[s:e].strip()
            if mp.JUNK_CHARS & set(piece):
                kinds.add("garble")
                assert all(mp.JUNK_CHARS & set(chunk) for chunk in piece.split())
            elif set(words(piece)) & NEGATIVE_WORDS:
                kinds.add("negative")
                assert any(piece == c.format(w) for c in mp.CARRIERS for w in mp.NEGATIVE_SLOT_WORDS)
            else:
                kinds.add("repeat")
                assert text.count(piece) >= 1 + nc.REPEAT_COPIES  # the sentence and its two copies
            for ks, ke in row["chosen_key_spans"]:
                assert e <= ks or ke <= s
    assert kinds == {"garble", "negative", "repeat"}


def test_removing_the_junk_gives_the_clean_pairs_and_the_junk_costs_reward(noisy, clean):
    """noise_share=0 with the same seed makes the same pairs without junk: cut the junk spans out of a noisy
    chosen response and its words are the clean one's; every noisy chosen response earns less gold reward."""
    assert not any(row["chosen_junk_spans"] for row in clean)
    assert list(clean["rejected"]) == list(noisy["rejected"])
    for n, c in zip(noisy, clean):
        text = n["chosen"]
        for s, e in sorted(n["chosen_junk_spans"], reverse=True):
            text = text[:s] + text[e:]
        assert text.split() == c["chosen"].split()
        assert n["chosen_gold"] < c["chosen_gold"]


def test_avoid_tokens_are_the_junk_tokens_of_the_chosen_response(noisy, tok):
    task = get_task("noisy_chosen")
    for row in noisy:
        avoid_c, avoid_r = task.avoid_tokens(tok, row)
        key_c, key_r = task.key_tokens(tok, row)
        assert len(avoid_c) == len(row["chosen_input_ids"]) and not any(avoid_r)
        assert any(avoid_c) and not any(a and k for a, k in zip(avoid_c, key_c))
        junk_text = tok.decode([t for t, m in zip(row["chosen_input_ids"], avoid_c) if m])
        spans_text = " ".join(row["chosen"][s:e] for s, e in row["chosen_junk_spans"])
        assert junk_text.split() == spans_text.split()
        assert any(key_r)


def test_junk_kinds_and_bad_options(model, tok):
    prompts = story_prompts(8, seed=3)
    only = nc.make_pairs(model, tok, prompts, max_new_tokens=24, seed=3, junk_kinds="garble", junk_spans=1)
    for row in only:
        assert len(row["chosen_junk_spans"]) == 1
        s, e = row["chosen_junk_spans"][0]
        assert mp.JUNK_CHARS & set(row["chosen"][s:e])
    for bad, match in (({"junk_kinds": ["shouting"]}, "junk_kinds"), ({"junk_kinds": []}, "junk_kinds"),
                       ({"noise_share": 2.0}, "noise_share"), ({"junk_spans": -1}, "junk_spans")):
        with pytest.raises(ConfigError, match=match):
            nc.make_pairs(model, tok, prompts, max_new_tokens=8, **bad)


def test_task_registration_points_at_the_clean_data_for_the_oracle():
    task = get_task("noisy_chosen")
    assert task.gold_reward == "sepo.tasks.noisy_chosen:gold_reward_batch"
    assert task.oracle_options == {"noise_share": 0.0} and task.options["noise_share"] == 1.0
    from sepo.evaluation import load_reward

    assert load_reward(task.gold_reward)(["p"], ["It was so sad. <br>"]) == [pytest.approx(-1 - 10 * 1 / 5)]
