"""The minimal-pairs task: edits land where the key spans say, labels follow the gold reward, seeds reproduce."""

from __future__ import annotations

import pytest

from sepo.data.options import DataOptions
from sepo.data.tokenize import tokenize_pairs
from sepo.errors import ConfigError, DataError
from sepo.models import load_causal_lm, load_tokenizer
from sepo.tasks import TASK_NAMES, get_task
from sepo.tasks import minimal_pairs as mp
from sepo.tasks.sentiment import LEXICON, NEGATIVE_WORDS, POSITIVE_WORDS, sentiment, story_prompts, words


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("stories260k")


@pytest.fixture(scope="module")
def model():
    return load_causal_lm("stories260k", trainable=False)


@pytest.fixture(scope="module")
def pairs(model, tok):
    return mp.make_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=32, seed=0)


def polarity(word: str) -> int:
    return (word in POSITIVE_WORDS) - (word in NEGATIVE_WORDS)


def span_words(text: str, spans) -> list[str]:
    return [text[s:e].strip() for s, e in spans]


def test_slot_words_are_in_the_right_lexicon_and_fit_every_carrier():
    assert set(mp.POSITIVE_SLOT_WORDS) <= POSITIVE_WORDS and set(mp.NEGATIVE_SLOT_WORDS) <= NEGATIVE_WORDS
    assert not set(mp.NEUTRAL_SLOT_WORDS) & LEXICON
    assert all(c.count("{}") == 1 and " {}" in c and not set(words(c.format(""))) & LEXICON for c in mp.CARRIERS)


def test_neutral_sentences_keep_complete_sentences_without_lexicon_words_or_junk():
    text = 'Tom ran to the park. He was happy! "Look," said Mom. It had a <br> tag.\nThe end. And then he'
    pieces = mp.neutral_sentences(text)
    assert [p.text for p in pieces] == ["Tom ran to the park.", '"Look," said Mom.', "The end."]
    assert [p.lead for p in pieces] == [" ", " ", "\n"]  # the paragraph break before "The end." is kept


def test_assemble_places_carriers_and_marks_the_edited_word_with_its_space():
    """Base [A., B.], carrier "Everyone felt {}." with "glad" at boundary 1 ->
    " A. Everyone felt glad.\nB." (" A." 0-3, " Everyone" 3-12, " felt" 12-17, " glad" 17-22): the word's span,
    with the space before it, is [17, 22)."""
    base = [mp.Piece("A."), mp.Piece("B.", lead="\n")]
    pieces = mp.insert(base, [(1, mp.carrier_piece("Everyone felt {}.", "glad"))])
    resp = mp.assemble(pieces)
    assert resp.text == " A. Everyone felt glad.\nB."
    assert resp.key_spans == [[17, 22]] and resp.text[17:22] == " glad"
    # several inserts at one boundary keep their order; boundary len(base) appends
    both = mp.insert(base, [(2, mp.Piece("C.")), (0, mp.Piece("X.")), (2, mp.Piece("D."))])
    assert [p.text for p in both] == ["X.", "A.", "B.", "C.", "D."]


def test_span_mask_marks_the_tokens_of_a_hand_made_pair(tok):
    """" It was so happy." -> tokens ▁It ▁was ▁so ▁happy . </s>: the span " happy" covers ▁happy only;
    " It was so sad." -> ▁It ▁was ▁so ▁sa d . </s>: " sad" covers ▁sa and d; first_token_only keeps ▁sa."""
    prompt = "Tom went to the park."
    rows = {"index": [0], "prompt": [prompt], "chosen": [" It was so happy."], "rejected": [" It was so sad."]}
    import datasets

    row = tokenize_pairs(datasets.Dataset.from_dict(rows), tok, DataOptions(chat_template="none")).dataset[0]
    row = {**row, "chosen_key_spans": [[10, 16]], "rejected_key_spans": [[10, 14]], "chosen_gold": 1.0,
           "rejected_gold": -1.0}
    chosen, rejected = mp.key_tokens(tok, row)
    pieces = tok.convert_ids_to_tokens(row["rejected_input_ids"])
    assert [p for p, m in zip(tok.convert_ids_to_tokens(row["chosen_input_ids"]), chosen) if m] == ["\u2581happy"]
    assert [p for p, m in zip(pieces, rejected) if m] == ["\u2581sa", "d"]
    assert chosen[-1] is False and rejected[-1] is False  # EOS
    first = mp.key_tokens(tok, row, first_token_only=True)[1]
    assert [p for p, m in zip(pieces, first) if m] == ["\u2581sa"]
    # by polarity: a negative word in the chosen response or a positive one in the rejected response is not key
    swapped = {**row, "chosen": row["rejected"], "rejected": row["chosen"], "chosen_input_ids": row["rejected_input_ids"],
               "rejected_input_ids": row["chosen_input_ids"], "chosen_key_spans": row["rejected_key_spans"],
               "rejected_key_spans": row["chosen_key_spans"]}
    assert not any(mp.key_tokens(tok, swapped)[0]) and not any(mp.key_tokens(tok, swapped)[1])
    assert mp.edited_tokens(tok, swapped) == (rejected, chosen)  # the edits themselves are where they were


def test_offsets_refuse_ids_of_another_tokenizer(tok, shared, pairs):
    gpt2 = load_tokenizer(str(shared / "tokenizers" / "gpt2"))
    with pytest.raises(DataError, match="not the tokenization"):
        mp.key_tokens(gpt2, pairs[0])


def test_columns_and_ids_are_those_of_sepo_data_prepare(pairs, tok):
    assert len(pairs) == 24  # no ties: every pair differs by its edits
    for c in ("index", "prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
              "chosen_gold", "rejected_gold", "label_flipped", "chosen_key_spans", "rejected_key_spans"):
        assert c in pairs.column_names
    again = tokenize_pairs(pairs.select_columns(["index", "prompt", "chosen", "rejected"]), tok,
                           DataOptions(chat_template="none")).dataset
    for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert list(again[c]) == list(pairs[c])
    assert all(ids[-1] == tok.eos_token_id for ids in [*pairs["chosen_input_ids"], *pairs["rejected_input_ids"]])
    assert all(ids[0] == tok.bos_token_id for ids in pairs["prompt_input_ids"])


def test_edits_land_where_the_key_spans_say(pairs, tok):
    for row in pairs:
        cw, rw = span_words(row["chosen"], row["chosen_key_spans"]), span_words(row["rejected"], row["rejected_key_spans"])
        assert len(cw) == len(rw) == 2
        assert all(w in mp.POSITIVE_SLOT_WORDS + mp.NEGATIVE_SLOT_WORDS + mp.NEUTRAL_SLOT_WORDS for w in cw + rw)
        assert all(polarity(a) > polarity(b) for a, b in zip(cw, rw))  # each edit makes the chosen side better
        # the base is neutral: the lexicon words of each response are exactly its edited words
        assert set(words(row["chosen"])) & LEXICON == {w for w in cw if w in LEXICON}
        assert set(words(row["rejected"])) & LEXICON == {w for w in rw if w in LEXICON}
        chosen, rejected = mp.edited_tokens(tok, row)
        # the two responses less their edited tokens are the same tokens: the edits are all that differs
        assert mp.without(row["chosen_input_ids"], chosen) == mp.without(row["rejected_input_ids"], rejected)
        c, r = row["chosen_input_ids"], row["rejected_input_ids"]
        first = next(i for i, (a, b) in enumerate(zip(c, r)) if a != b)
        assert chosen[first] and rejected[first]  # the first differing token is an edited token on both sides
        assert words(tok.decode([t for t, m in zip(c, chosen) if m])) == cw
        # the default edits are all positive vs negative, so every edited token is a key token of its side
        assert (chosen, rejected) == mp.key_tokens(tok, row)


def test_labels_follow_the_gold_reward(pairs):
    """The gold difference of a pair is its edits': sentiment counts +1 per positive and -1 per negative
    edited word (the base has none), and the shared base adds the same repetition penalty to both sides."""
    for row in pairs:
        assert row["chosen_gold"] > row["rejected_gold"] and not row["label_flipped"]
        cw, rw = span_words(row["chosen"], row["chosen_key_spans"]), span_words(row["rejected"], row["rejected_key_spans"])
        assert sentiment(row["chosen"]) - sentiment(row["rejected"]) == sum(map(polarity, cw)) - sum(map(polarity, rw))
        assert row["chosen_gold"] == pytest.approx(mp.gold_reward(row["chosen"]), abs=1e-6)
        assert row["rejected_gold"] == pytest.approx(mp.gold_reward(row["rejected"]), abs=1e-6)


def test_neutral_share_one_contrasts_every_edit_with_a_neutral_word(model, tok):
    ds = mp.make_pairs(model, tok, story_prompts(12, seed=1), max_new_tokens=24, seed=1, neutral_share=1.0,
                       num_edits=3)
    for row in ds:
        cw, rw = span_words(row["chosen"], row["chosen_key_spans"]), span_words(row["rejected"], row["rejected_key_spans"])
        assert len(cw) == 3 and all(polarity(a) - polarity(b) == 1 for a, b in zip(cw, rw))
        assert all((a in mp.NEUTRAL_SLOT_WORDS) != (b in mp.NEUTRAL_SLOT_WORDS) for a, b in zip(cw, rw))
        # key tokens by polarity: the positive words of the chosen side, the negative words of the rejected side
        chosen, rejected = mp.key_tokens(tok, row)
        assert words(tok.decode([t for t, m in zip(row["chosen_input_ids"], chosen) if m])) == [
            w for w in cw if w in POSITIVE_WORDS]
        assert words(tok.decode([t for t, m in zip(row["rejected_input_ids"], rejected) if m])) == [
            w for w in rw if w in NEGATIVE_WORDS]


def test_seeds_reproduce(model, tok, pairs):
    again = mp.make_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=32, seed=0)
    assert again.to_dict() == pairs.to_dict()
    other = mp.make_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=32, seed=1)
    assert list(other["chosen"]) != list(pairs["chosen"])


def test_label_noise_flips_labels_and_clears_their_key_tokens(model, tok):
    ds = mp.make_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=16, seed=0, label_noise=0.4)
    flipped = [c < r for c, r in zip(ds["chosen_gold"], ds["rejected_gold"])]
    assert flipped == list(ds["label_flipped"]) and any(flipped) and not all(flipped)
    row = ds[flipped.index(True)]
    assert not any(mp.key_tokens(tok, row)[0]) and not any(mp.key_tokens(tok, row)[1])


def test_bradley_terry_labels_go_against_the_gold_reward_sometimes(model, tok):
    """At a temperature far above the gold differences (2 to 4) a label is nearly a coin flip: all 24 right has
    probability about 2^-24."""
    ds = mp.make_pairs(model, tok, story_prompts(24, seed=0), max_new_tokens=16, seed=0, bt_temperature=1e6)
    wrong = [c < r for c, r in zip(ds["chosen_gold"], ds["rejected_gold"])]
    assert any(wrong) and not any(ds["label_flipped"])


def test_independent_contexts_differ_everywhere_but_are_decided_by_the_edits(model, tok):
    ds = mp.make_pairs(model, tok, story_prompts(16, seed=2), max_new_tokens=32, seed=2, shared_context=False)
    assert sum(c != r for c, r in zip(ds["chosen"], ds["rejected"])) == len(ds)
    for row in ds:
        cw, rw = span_words(row["chosen"], row["chosen_key_spans"]), span_words(row["rejected"], row["rejected_key_spans"])
        assert set(words(row["chosen"])) & LEXICON == {w for w in cw if w in LEXICON}
        assert sentiment(row["chosen"]) - sentiment(row["rejected"]) == sum(map(polarity, cw)) - sum(map(polarity, rw))
        chosen, _ = mp.edited_tokens(tok, row)
        assert words(tok.decode([t for t, m in zip(row["chosen_input_ids"], chosen) if m])) == cw


def test_bad_options_are_refused(model, tok):
    prompts = story_prompts(4, seed=0)
    for bad, match in (({"num_edits": 0}, "num_edits"), ({"neutral_share": 1.5}, "neutral_share"),
                       ({"bt_temperature": -1.0}, "bt_temperature"), ({"label_noise": 0.5}, "label_noise")):
        with pytest.raises(ConfigError, match=match):
            mp.make_pairs(model, tok, prompts, max_new_tokens=8, **bad)


def test_pairs_longer_than_the_model_are_refused(tok):
    small = load_causal_lm("stories260k", trainable=False)
    small.config.max_position_embeddings = 16
    with pytest.raises(ConfigError, match="lower max_new_tokens"):
        mp.make_pairs(small, tok, story_prompts(4, seed=0), max_new_tokens=24)


def test_every_registered_task_takes_its_own_options(model, tok):
    """Each task's ``options`` are keyword arguments of its ``make_pairs``, so ``make_pairs(**task.options)`` works."""
    import inspect

    for name in TASK_NAMES:
        task = get_task(name)
        params = inspect.signature(task.make_pairs).parameters
        assert set(task.options) <= set(params), name
        assert set(task.oracle_options or {}) <= set(params), name
    task = get_task("minimal_pairs")
    ds = task.make_pairs(model, tok, task.prompts(6, 0), max_new_tokens=16, label_noise=0.0, seed=0, **task.options)
    masks = task.key_tokens(tok, ds[0])
    assert [len(m) for m in masks] == [len(ds[0]["chosen_input_ids"]), len(ds[0]["rejected_input_ids"])]
    with pytest.raises(ConfigError, match="known tasks: sentiment, minimal_pairs, noisy_chosen"):
        get_task("minimal")
