"""The embedded task with known answers: make story continuations happier.

* **Prompts** -- story openings built from templates in the vocabulary of TinyStories (the data the bundled
  stories260K model was trained on), deterministic for a seed: :func:`story_prompts`.
* **Gold reward** -- a transparent sentiment score of a continuation: the number of *distinct* positive
  lexicon words minus the number of *distinct* negative ones, minus a penalty for repeated text and for
  near-empty text: :func:`gold_reward`. Listing the same happy word ten times earns it once and costs the
  repetition penalty.
* **Key tokens** -- the tokens that make up lexicon words. They are what the gold reward depends on, so a
  token-level reward should concentrate on them: :func:`lexicon_token_mask`.
* **Pairs** -- two continuations per prompt sampled from a reference model, labelled by a Bradley-Terry draw
  on the gold reward, P(y1 > y2) = sigmoid((r(y1) - r(y2)) / tau), then flipped with probability
  ``label_noise``: :func:`make_preference_pairs`.

The gold reward is also usable as an ``sepo eval --reward`` callable: ``sepo.tasks.sentiment:gold_reward_batch``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

POSITIVE_WORDS = frozenset([
    "happy", "happily", "glad", "joy", "joyful", "fun", "funny", "love", "loved", "loves", "lovely", "smile",
    "smiled", "smiles", "smiling", "laugh", "laughed", "laughing", "laughs", "hug", "hugged", "hugs", "kind",
    "nice", "good", "great", "best", "beautiful", "pretty", "proud", "excited", "enjoy", "enjoyed", "thank",
    "thanked", "thanks", "yummy", "wonderful", "amazing", "friendly", "cheer", "cheered", "safe", "gentle",
    "brave", "together",
])
NEGATIVE_WORDS = frozenset([
    "sad", "sadly", "cry", "cried", "cries", "crying", "tears", "angry", "mad", "upset", "scared", "afraid",
    "fear", "frightened", "hurt", "hurts", "pain", "bad", "sorry", "lonely", "mean", "yelled", "shouted",
    "broke", "broken", "ruined", "worried", "tired", "sick", "scary", "dangerous", "naughty", "ouch", "lost",
    "fell", "grumpy", "terrible", "horrible", "hate", "hated", "bored",
])
LEXICON = POSITIVE_WORDS | NEGATIVE_WORDS

REPETITION_WEIGHT = 2.0
"""Penalty per unit of repetition (the share of repeated word trigrams, 0..1)."""
MIN_WORDS = 4
"""Continuations with fewer words lose 1 (degenerate: empty or cut off at once)."""

_WORD = re.compile(r"[a-z]+")

# --------------------------------------------------------------------------- prompts

_NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue", "Tim", "Max", "Anna", "Sam", "Lucy", "Jack", "Amy", "Bob", "Sara",
          "Timmy", "Jill", "Zoe", "Leo", "Mark", "Emma"]
_WHO = [("a little girl named {n}", "She", "her"), ("a little boy named {n}", "He", "his"),
        ("a girl named {n}", "She", "her"), ("a boy named {n}", "He", "his"), ("a small dog named {n}", "He", "his"),
        ("a little cat named {n}", "She", "her"), ("a bird named {n}", "He", "his"),
        ("a big bear named {n}", "He", "his")]
_PLACES = ["park", "forest", "garden", "house", "beach", "town", "school", "store", "pond", "hill", "farm", "river"]
_THINGS = ["ball", "box", "toy", "book", "tree", "car", "cake", "kite", "hat", "stick", "rock", "flower", "boat",
           "truck", "doll", "shell", "cup", "bike", "bag", "key"]
_ADJ = ["big", "small", "red", "blue", "green", "little", "tiny", "shiny", "round", "soft", "tall", "yellow"]
_TEMPLATES = [
    "Once upon a time, there was {who}.",
    "Once upon a time, there was {who}. {He} lived near a {place}.",
    "Once upon a time, {who} had a {adj} {thing}.",
    "One day, {n} went to the {place}.",
    "One day, {n} found a {adj} {thing} in the {place}.",
    "{n} had a {adj} {thing}.",
    "{n} and {m} went to the {place} to play.",
    "{n} saw a {adj} {thing} near the {place}.",
    "There was {who} who lived in a {adj} house.",
    "{n} wanted to play with the {adj} {thing}.",
    "One morning, {n} woke up and looked at the {thing}.",
    "{n} and {his} mom went to the {place}.",
]


def story_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct story openings, the same for the same seed (at most a few thousand exist)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * max(n, 1):
            raise ValueError(f"cannot build {n} distinct story prompts from the templates")
        name, other = rng.sample(_NAMES, 2)
        who, he, his = rng.choice(_WHO)
        text = rng.choice(_TEMPLATES).format(
            who=who.format(n=name), n=name, m=other, place=rng.choice(_PLACES), thing=rng.choice(_THINGS),
            adj=rng.choice(_ADJ), He=he, his=his)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# --------------------------------------------------------------------------- gold reward


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition(text: str) -> float:
    """Share of repeated word trigrams, 0 (none) .. 1 (one trigram over and over)."""
    w = words(text)
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def sentiment(text: str) -> int:
    """#distinct positive lexicon words - #distinct negative lexicon words."""
    present = set(words(text))
    return len(present & POSITIVE_WORDS) - len(present & NEGATIVE_WORDS)


def gold_reward(text: str) -> float:
    """``sentiment(text) - REPETITION_WEIGHT * repetition(text) - (1 if fewer than MIN_WORDS words)``.

    Examples: "She was happy." -> 1 - 0 - 1 = 0 (too short); "She was happy and she smiled at her mom."
    -> 2; the same with "happy happy happy ..." -> 1 minus the repetition penalty."""
    r = float(sentiment(text)) - REPETITION_WEIGHT * repetition(text)
    if len(words(text)) < MIN_WORDS:
        r -= 1.0
    return r


def gold_reward_batch(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The gold reward in the ``sepo eval --reward module:function`` signature (prompts are not scored)."""
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions must have the same length")
    return [gold_reward(c) for c in completions]


# --------------------------------------------------------------------------- key tokens


def token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of ``ids`` and the character span of each token in it (special tokens: empty spans).

    A fast tokenizer decodes incrementally (``tokenizers.decoders.DecodeStream``: what each token adds,
    linear in the length; a token that ends inside a multi-byte character adds nothing and the one that
    completes it adds the character). Otherwise growing prefixes are decoded, which works for any tokenizer
    whose decoding of a prefix is a prefix of the full decoding (SentencePiece and byte-level BPE both are,
    away from split multi-byte characters) and costs quadratic time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from tokenizers.decoders import DecodeStream  # tokenizers >= 0.21
    except ImportError:
        backend = None
    if backend is not None:
        stream = DecodeStream(skip_special_tokens=True)
        text, spans = "", []
        for i in ids:
            piece = stream.step(backend, int(i)) or ""
            spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans
    spans, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)
        start = len(prev) if cur.startswith(prev) else min(len(prev), len(cur))
        spans.append((start, len(cur)))
        prev = cur
    return prev, spans


def lexicon_token_mask(tokenizer, ids: Sequence[int], lexicon: frozenset[str] = LEXICON, *,
                       first_token_only: bool = False) -> list[bool]:
    """True for each token that overlaps (a non-space character of) a lexicon word of the decoded text;
    ``first_token_only``: only the first such token of each word."""
    text, spans = token_spans(tokenizer, ids)
    hits = [(m.start(), m.end()) for m in re.finditer(r"[A-Za-z]+", text) if m.group().lower() in lexicon]
    mask = [False] * len(spans)
    for hs, he in hits:
        overlapping = [i for i, (s, e) in enumerate(spans) if s < he and hs < e]
        for i in overlapping[:1] if first_token_only else overlapping:
            mask[i] = True
    return mask


def polarity_key_tokens(tokenizer, row, *, first_token_only: bool = False) -> tuple[list[bool], list[bool]]:
    """The task's key tokens by polarity (the ``Task.key_tokens`` of ``sepo.tasks``): positive-lexicon tokens of
    the chosen response, negative-lexicon tokens of the rejected one. A positive word in a rejected response
    earns a high token reward and is rightly not in its bottom k, so it is not a key token there.
    ``first_token_only`` keeps the first token of each lexicon word."""
    return (lexicon_token_mask(tokenizer, row["chosen_input_ids"], POSITIVE_WORDS, first_token_only=first_token_only),
            lexicon_token_mask(tokenizer, row["rejected_input_ids"], NEGATIVE_WORDS,
                               first_token_only=first_token_only))


def selection_quality(selected: Sequence[Sequence[bool]], key: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Precision (share of selected tokens that are key tokens) and recall (share of key tokens selected),
    pooled over all responses; ``key_fraction`` is the precision of a selection made at random."""
    tp = sel = pos = total = 0
    for s, k in zip(selected, key):
        if len(s) != len(k):
            raise ValueError(f"a selection mask has {len(s)} entries for a response of {len(k)} tokens")
        tp += sum(1 for a, b in zip(s, k) if a and b)
        sel += sum(map(bool, s))
        pos += sum(map(bool, k))
        total += len(k)
    return {"precision": tp / sel if sel else 0.0, "recall": tp / pos if pos else 0.0,
            "selected_fraction": sel / total if total else 0.0, "key_fraction": pos / total if total else 0.0}


# --------------------------------------------------------------------------- preference pairs


def make_preference_pairs(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48,
                          temperature: float = 1.0, bt_temperature: float = 1.0, label_noise: float = 0.0,
                          skip_ties: bool = True, batch_size: int = 64, seed: int = 0):
    """Canonical tokenized pairs (``datasets.Dataset``) from two reference samples per prompt.

    Labels: y1 is chosen with probability sigmoid((r(y1) - r(y2)) / bt_temperature) (Bradley-Terry), then the
    label is flipped with probability ``label_noise``. ``skip_ties`` drops pairs whose gold rewards are equal
    (their label would be a coin flip). Extra columns: ``chosen_gold``, ``rejected_gold`` (gold rewards) and
    ``label_flipped``."""
    import datasets

    from sepo.evaluation import generate

    if not 0.0 <= label_noise < 0.5:
        raise ValueError("label_noise must be in [0, 0.5)")
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    doubled = [ids for ids in prompt_ids for _ in range(2)]
    samples = generate(model, tokenizer, doubled, max_new_tokens=max_new_tokens, do_sample=True,
                       temperature=temperature, batch_size=batch_size, seed=seed)
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    cols: dict[str, list] = {k: [] for k in ("index", "prompt", "chosen", "rejected", "prompt_input_ids",
                                             "chosen_input_ids", "rejected_input_ids", "chosen_gold",
                                             "rejected_gold", "label_flipped")}
    for i, prompt in enumerate(prompts):
        (t1, y1), (t2, y2) = samples[2 * i], samples[2 * i + 1]
        r1, r2 = gold_reward(t1), gold_reward(t2)
        if t1 == t2 or (skip_ties and r1 == r2):
            continue
        first = rng.random() < _sigmoid((r1 - r2) / bt_temperature)
        flipped = rng.random() < label_noise
        if flipped:
            first = not first
        (tc, yc, rc), (tr, yr, rr) = ((t1, y1, r1), (t2, y2, r2)) if first else ((t2, y2, r2), (t1, y1, r1))
        cols["index"].append(i)
        cols["prompt"].append(prompt)
        cols["chosen"].append(tc)
        cols["rejected"].append(tr)
        cols["prompt_input_ids"].append(prompt_ids[i])
        cols["chosen_input_ids"].append(_end_with_eos(yc, eos))
        cols["rejected_input_ids"].append(_end_with_eos(yr, eos))
        cols["chosen_gold"].append(rc)
        cols["rejected_gold"].append(rr)
        cols["label_flipped"].append(flipped)
    features = datasets.Features({
        "index": datasets.Value("int64"), "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"), "prompt_input_ids": datasets.List(datasets.Value("int32")),
        "chosen_input_ids": datasets.List(datasets.Value("int32")),
        "rejected_input_ids": datasets.List(datasets.Value("int32")), "chosen_gold": datasets.Value("float32"),
        "rejected_gold": datasets.Value("float32"), "label_flipped": datasets.Value("bool")})
    return datasets.Dataset.from_dict(cols, features=features)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _end_with_eos(ids: list[int], eos: int) -> list[int]:
    return list(ids) if ids and ids[-1] == eos else [*ids, eos]
