"""Noisy chosen: the chosen response wins on the gold reward, but also carries content a policy should not learn.

The pairs are minimal pairs (:mod:`sepo.tasks.minimal_pairs`: a shared neutral base sampled from the model,
``num_edits`` carrier sentences whose adjective decides the preference), and then the better response gets
``junk_spans`` pieces of junk at random sentence boundaries, each of a kind drawn from ``junk_kinds``:

* ``repeat`` -- a sentence of the base (of at least 4 words) said again, twice, right after itself;
* ``garble`` -- a span of scraped-web debris ("<br> &nbsp; ###"), characters stories never use;
* ``negative`` -- a carrier sentence with a negative lexicon word, outside the decisive positions.

A junk piece is only added if it lowers the gold reward and the better response still beats the worse one, so the
chosen response always wins (before label noise) -- by its edits, in spite of its junk. This is the situation of
the paper's out-of-distribution claim: raising the likelihood of *every* chosen token (SFT, SimPO, DPO, SePO on
random tokens) also teaches the junk, while a selection that finds the decisive tokens can leave it out.

* **Gold reward** -- the sentiment gold reward (which already charges 1 per distinct negative word and
  ``REPETITION_WEIGHT`` x the share of repeated word trigrams) minus ``GARBLE_WEIGHT`` x the share of
  whitespace-separated chunks holding a junk character: :func:`gold_reward`. A policy that picks up any of
  the three habits loses reward for it.
* **Key tokens** -- the edited words, as in minimal pairs (:func:`sepo.tasks.minimal_pairs.key_tokens`: the
  positive ones of the chosen response, the negative ones of the rejected response); the negative junk words
  of a chosen response are not key tokens.
* **Junk tokens** -- the tokens of the junk pieces (whole inserted sentences or debris), stored as character spans (``chosen_junk_spans``,
  ``rejected_junk_spans``): :func:`avoid_tokens` gives those of the chosen response, which a top-k selection
  should leave out.
* **The oracle's data** -- an oracle trained on these pairs sees junk in every chosen response and learns to
  reward it; the paper's setting trains the oracle on in-distribution data and selects on the noisy data.
  ``noise_share=0`` (the task's ``oracle_options``) makes the same pairs without junk: ``sepo pipeline``
  with ``data`` = those clean pairs and ``score_data`` = the noisy ones (docs/tasks.md).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from sepo.errors import ConfigError
from sepo.tasks import minimal_pairs as mp
from sepo.tasks import sentiment

GARBLE_WEIGHT = 10.0
"""Penalty per unit of garble (the share of chunks holding a junk character, 0..1): 10% garbled chunks cost as
much as one negative word."""
JUNK_KINDS = ("repeat", "garble", "negative")
REPEAT_COPIES = 2
MIN_REPEAT_WORDS = 4  # a repeated sentence of fewer words may repeat no word trigram, and so cost nothing
DEBRIS = ("<br>", "&nbsp;", "</p>", "<div>", "{{", "}}", "###", "@@", "|", "~~", "**", "[1]", "&amp;", "%%", "+++",
          "==", "/*", "*/", "<>", "^^")
OPTIONS = {**mp.OPTIONS, "junk_spans": 2, "junk_kinds": list(JUNK_KINDS), "noise_share": 1.0}


# --------------------------------------------------------------------------- gold reward


def garbled_share(text: str) -> float:
    """Share of whitespace-separated chunks that hold a junk character (``minimal_pairs.JUNK_CHARS``)."""
    chunks = text.split()
    if not chunks:
        return 0.0
    return sum(1 for c in chunks if mp.JUNK_CHARS & set(c)) / len(chunks)


def gold_reward(text: str) -> float:
    """``sentiment.gold_reward(text) - GARBLE_WEIGHT * garbled_share(text)``.

    Example: "Everyone felt happy. <br> &nbsp; It was a long day." -> 1 positive word, no repeated trigram,
    10 chunks of which 2 garbled: 1 - 10 * 0.2 = -1."""
    return sentiment.gold_reward(text) - GARBLE_WEIGHT * garbled_share(text)


def gold_reward_batch(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The gold reward in the ``sepo eval --reward module:function`` signature (prompts are not scored)."""
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions must have the same length")
    return [gold_reward(c) for c in completions]


# --------------------------------------------------------------------------- junk


def junk_piece(rng: random.Random, kind: str, pieces: Sequence[mp.Piece]) -> tuple[int, mp.Piece, int] | None:
    """One junk piece for the response ``pieces``: ``(boundary, piece, copies)``, or None when this kind has no
    material (``repeat`` in a response without base sentences)."""
    if kind == "repeat":
        base = [i for i, p in enumerate(pieces) if p.kind == "base" and len(sentiment.words(p.text)) >= MIN_REPEAT_WORDS]
        if not base:
            return None
        i = rng.choice(base)
        text = pieces[i].text
        return i + 1, mp.Piece(text, kind="junk", mark=(-1, len(text))), REPEAT_COPIES
    if kind == "garble":
        text = " ".join(rng.choice(DEBRIS) for _ in range(rng.randint(2, 4)))
        return rng.randint(0, len(pieces)), mp.Piece(text, kind="junk", mark=(-1, len(text))), 1
    used = set(sentiment.words(mp.assemble(pieces).text))
    word = rng.choice([w for w in mp.NEGATIVE_SLOT_WORDS if w not in used])
    text = rng.choice(mp.CARRIERS).format(word)
    return rng.randint(0, len(pieces)), mp.Piece(text, kind="junk", mark=(-1, len(text))), 1


def junk_decorator(junk_spans: int, junk_kinds: Sequence[str], noise_share: float) -> mp.Decorate:
    """Adds up to ``junk_spans`` junk pieces to a share ``noise_share`` of the better responses, each only if it
    lowers the response's gold reward (every piece of junk costs reward) and the response still beats the worse
    one's gold reward ``worse_gold`` afterwards. The random draws do not depend on ``noise_share``, so the same
    seed with ``noise_share=0`` gives the same pairs without their junk."""

    def decorate(rng: random.Random, pieces: list[mp.Piece], worse_gold: float) -> list[mp.Piece]:
        noisy = rng.random() < noise_share
        for _ in range(junk_spans):
            kind = rng.choice(list(junk_kinds))
            junk = junk_piece(rng, kind, pieces)
            if not noisy or junk is None:
                continue
            at, piece, copies = junk
            candidate = mp.insert(pieces, [(at, piece)] * copies)
            before, after = gold_reward(mp.assemble(pieces).text), gold_reward(mp.assemble(candidate).text)
            if worse_gold < after < before:
                pieces = candidate
        return pieces

    return decorate


# --------------------------------------------------------------------------- pairs and tokens


def make_pairs(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, label_noise: float = 0.0,
               seed: int = 0, num_edits: int = OPTIONS["num_edits"], neutral_share: float = OPTIONS["neutral_share"],
               shared_context: bool = OPTIONS["shared_context"], bt_temperature: float = OPTIONS["bt_temperature"],
               junk_spans: int = OPTIONS["junk_spans"], junk_kinds: Sequence[str] = JUNK_KINDS,
               noise_share: float = OPTIONS["noise_share"], temperature: float = 1.0, batch_size: int = 64):
    """Noisy-chosen pairs (``Task.make_pairs``): minimal pairs whose better response also carries junk. Columns: those
    of :func:`sepo.tasks.minimal_pairs.make_pairs` plus ``chosen_junk_spans`` and ``rejected_junk_spans``."""
    if junk_spans < 0:
        raise ConfigError(f"junk_spans must be >= 0 (got {junk_spans})")
    if isinstance(junk_kinds, str):
        junk_kinds = [k for k in re.split(r"[,\s]+", junk_kinds) if k]
    unknown = [k for k in junk_kinds if k not in JUNK_KINDS]
    if unknown or not junk_kinds:
        raise ConfigError(f"junk_kinds must be a non-empty list of {', '.join(JUNK_KINDS)} (got {list(junk_kinds)})")
    if not 0.0 <= noise_share <= 1.0:
        raise ConfigError(f"noise_share must be in [0, 1] (got {noise_share})")
    return mp.build_pairs(model, tokenizer, prompts, max_new_tokens=max_new_tokens, label_noise=label_noise,
                          seed=seed, num_edits=num_edits, neutral_share=neutral_share, shared_context=shared_context,
                          bt_temperature=bt_temperature, gold=gold_reward,
                          decorate=junk_decorator(junk_spans, junk_kinds, noise_share), temperature=temperature,
                          batch_size=batch_size)


key_tokens = mp.key_tokens


def avoid_tokens(tokenizer, row, *, first_token_only: bool = False) -> tuple[list[bool], list[bool]]:
    """The junk tokens a selection should leave out (``Task.avoid_tokens``): those of the chosen response (a top-k
    selection that picks them trains the policy on junk). In a rejected response junk is rightly pushed down,
    so nothing there is to be avoided."""
    chosen = mp.side_mask(tokenizer, row, "chosen", "junk_spans", first_token_only=first_token_only)
    return chosen, [False] * len(row["rejected_input_ids"])
