"""The embedded sentiment task: prompts, gold reward, key tokens, labelled pairs."""

from __future__ import annotations

import pytest

from sepo.models import load_causal_lm, load_tokenizer
from sepo.tasks.sentiment import (
    LEXICON,
    MIN_WORDS,
    REPETITION_WEIGHT,
    gold_reward,
    gold_reward_batch,
    lexicon_token_mask,
    make_preference_pairs,
    repetition,
    selection_quality,
    sentiment,
    story_prompts,
    token_spans,
    words,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("stories260k")


def test_gold_reward_hand_computed():
    """"She was happy and she smiled at her mom." -> 2 positive words, no repeated trigram, 9 words: 2.
    "He was sad but then he was happy again." -> 1 - 1 = 0 ("he was" repeats, but no trigram does)."""
    assert gold_reward("She was happy and she smiled at her mom.") == 2.0
    assert gold_reward("He was sad but then he was happy again.") == 0.0
    assert gold_reward("The dog cried and was angry and mad.") == -3.0


def test_each_word_counts_once():
    assert sentiment("happy happy happy happy glad") == 2
    assert sentiment("She was sad, so sad, very sad.") == -1
    # repeating a happy word earns nothing more than saying it once
    assert gold_reward("Tom was happy and happy and happy and happy.") <= gold_reward("Tom was happy at the park.")


def test_repeated_and_degenerate_text_is_penalised():
    """"the cat is happy" x3: words = 12, trigrams = 10, distinct = 4 -> repetition 0.6; reward 1 - 2*0.6 = -0.2."""
    text = "The cat is happy. The cat is happy. The cat is happy."
    assert repetition(text) == pytest.approx(0.6)
    assert gold_reward(text) == pytest.approx(1 - REPETITION_WEIGHT * 0.6)
    assert gold_reward(text) < gold_reward("The cat is happy in the sun.")
    assert gold_reward("") == -1.0 and len(words("happy!")) < MIN_WORDS
    assert gold_reward("happy!") == 0.0  # 1 positive word - 1 for being degenerate


def test_batch_signature_scores_completions_only():
    assert gold_reward_batch(["sad sad sad prompt", "x"], ["She smiled at the kind dog.", "It was a day."]) == [2.0, 0.0]
    with pytest.raises(ValueError):
        gold_reward_batch(["a"], [])


def test_prompts_are_deterministic_distinct_and_neutral():
    a, b = story_prompts(300, seed=3), story_prompts(300, seed=3)
    assert a == b and len(set(a)) == 300 and story_prompts(300, seed=4) != a
    assert all(sentiment(p) == 0 and not set(words(p)) & LEXICON for p in a)


def test_lexicon_token_mask_marks_exactly_the_tokens_of_lexicon_words(tok):
    ids = tok(" The girl was happy and she cried.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pieces = tok.convert_ids_to_tokens(ids)
    mask = lexicon_token_mask(tok, ids)
    marked = "".join(p for p, m in zip(pieces, mask) if m).replace("\u2581", " ").split()
    assert marked == ["happy", "cried"]
    assert mask[-1] is False  # EOS is never a key token


class _SlowDecode:
    """A tokenizer seen without its Rust backend: token_spans falls back to decoding growing prefixes."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("name", ["stories260k", "gpt2"])
def test_token_spans_stream_and_prefix_decoding_agree(tok, shared, name):
    """The incremental (DecodeStream) and prefix-decoding paths give the same text and spans; the spans tile
    the text, and EOS has an empty span at its end."""
    t = tok if name == "stories260k" else load_tokenizer(str(shared / "tokenizers" / "gpt2"))
    ids = t(" Lily smiled, then she cried: \"no!\" 42 times.", add_special_tokens=False)["input_ids"] + [t.eos_token_id]
    text, spans = token_spans(t, ids)
    assert (text, spans) == token_spans(_SlowDecode(t), ids)
    assert text == t.decode(ids, skip_special_tokens=True)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1] == (len(text),) * 2


def test_selection_quality_hand_computed():
    """selected 4 tokens, 2 of them key; 3 key tokens in all; 10 tokens -> precision 1/2, recall 2/3."""
    sel = [[True, True, False, False, False], [True, True, False, False, False]]
    key = [[True, False, True, False, False], [False, True, False, False, False]]
    q = selection_quality(sel, key)
    assert q == {"precision": 0.5, "recall": pytest.approx(2 / 3), "selected_fraction": 0.4, "key_fraction": 0.3}


def test_pairs_are_labelled_by_the_gold_reward(tok):
    model = load_causal_lm("stories260k", trainable=False)
    ds = make_preference_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=16, bt_temperature=1e-3,
                               label_noise=0.0, seed=0)
    assert len(ds) > 0
    assert all(c > r for c, r in zip(ds["chosen_gold"], ds["rejected_gold"]))  # near-deterministic BT, no ties
    for row in ds:
        assert row["chosen_input_ids"][-1] == tok.eos_token_id == row["rejected_input_ids"][-1]
        assert row["prompt_input_ids"][0] == tok.bos_token_id
        assert gold_reward(row["chosen"]) == pytest.approx(row["chosen_gold"], abs=1e-6)
    noisy = make_preference_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=16, bt_temperature=1e-3,
                                  label_noise=0.4, seed=0)
    flipped = [c < r for c, r in zip(noisy["chosen_gold"], noisy["rejected_gold"])]
    assert flipped == list(noisy["label_flipped"]) and any(flipped)
