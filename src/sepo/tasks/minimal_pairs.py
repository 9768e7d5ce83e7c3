"""Minimal pairs: the two responses of a pair share every token but a few, and those few decide the preference.

* **Base text** -- one continuation per prompt sampled from the given model (e.g. the bundled stories260K), cut
  into sentences; sentences holding a sentiment-lexicon word or a character stories never use (``JUNK_CHARS``)
  are dropped, and so is an unfinished last sentence. What is left is neutral text in the model's own words:
  it earns no gold reward and cannot decide a preference. ``max_new_tokens`` sets its length (long responses
  = a few decisive tokens in long neutral filler).
* **Edits** -- ``num_edits`` short carrier sentences (``CARRIERS``, e.g. "Everyone felt {}.") are inserted at
  random sentence boundaries of the base. Both responses hold the same carriers at the same places; only the
  adjective differs: positive vs negative, or -- with probability ``neutral_share`` per edit -- positive vs
  neutral or neutral vs negative. The two words of an edit never begin with the same token, so the first
  token of every edit differs between the two responses.
* **Gold reward** -- the sentiment task's (:func:`sepo.tasks.sentiment.gold_reward`: distinct positive minus
  distinct negative lexicon words, minus penalties for repetition and near-empty text), usable by ``sepo eval``
  on any policy sample. On a pair it differs by the edits alone: 2 per opposite edit, 1 per neutral one.
* **Labels** -- by the gold reward: deterministic (``bt_temperature`` 0, the default) or a Bradley-Terry draw
  P(y1 > y2) = sigmoid((r1 - r2) / bt_temperature); then flipped with probability ``label_noise``.
* **Key tokens** -- the tokens of the edited words (each with the space before it), stored as character spans
  of the response text (``chosen_key_spans``, ``rejected_key_spans``) and mapped onto the token ids through the
  tokenizer's offsets: :func:`edited_tokens`. Take them out of both responses and what is left is the same
  token sequence. By polarity (:func:`key_tokens`, what a top-k / bottom-k selection should find): the edited
  positive words of the chosen response and the edited negative words of the rejected one.
* ``shared_context=False`` gives each response its own base sample (they then differ in every token, as in
  the sentiment task, while the preference is still decided by the edits alone).

Pairs are tokenized by :func:`sepo.data.tokenize.tokenize_pairs` (plain prompts, no chat template), so their
ids are exactly what ``sepo data prepare`` makes of the text columns.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sepo.errors import ConfigError, DataError, SepoError
from sepo.tasks.sentiment import LEXICON, NEGATIVE_WORDS, POSITIVE_WORDS, gold_reward, words

log = logging.getLogger(__name__)

# Adjectives that fit every carrier. Positive and negative ones are sentiment-lexicon words; neutral ones are not.
POSITIVE_SLOT_WORDS = ("happy", "glad", "joyful", "proud", "excited", "safe", "lovely", "wonderful", "amazing", "great",
                       "good", "nice", "kind", "friendly", "gentle", "brave", "funny", "beautiful", "pretty")
NEGATIVE_SLOT_WORDS = ("sad", "angry", "mad", "upset", "scared", "afraid", "frightened", "hurt", "bad", "sorry",
                       "lonely", "mean", "worried", "tired", "sick", "grumpy", "terrible", "horrible", "bored", "lost",
                       "scary", "naughty")
NEUTRAL_SLOT_WORDS = ("quiet", "busy", "warm", "cold", "slow", "hot", "wet", "ready", "still", "early", "late",
                      "sleepy", "sunny", "windy", "cloudy", "far")
CARRIERS = ("Everyone felt {}.", "They were all {}.", "The day was {}.", "It was so {}.")
MAX_EDITS = 8
JUNK_CHARS = frozenset("#$%&*+/<=>@[\\]^_`{|}~\ufffd")
"""Characters of scraped-web debris ("<br>", "&nbsp;") and the replacement character that undecodable byte tokens
decode to; stories do not use them."""

# a sentence: up to terminal punctuation (and closing quotes) followed by whitespace, or up to a line break / the end
_SENTENCE = re.compile(r"\S[^\n]*?(?:[.!?]+[\"'\u201d\u2019]*(?=\s|$)|(?=\n)|$)")
_COMPLETE = re.compile(r"[.!?][\"'\u201d\u2019]*$")

OPTIONS = {"num_edits": 2, "neutral_share": 0.0, "shared_context": True, "bt_temperature": 0.0}


# --------------------------------------------------------------------------- building responses


@dataclass(frozen=True)
class Piece:
    """A sentence of a response being built. ``mark``: the part (relative to ``text``; -1 = the whitespace
    before it) that is a key token span (``kind`` edit) or a span to avoid (``kind`` junk)."""

    text: str
    lead: str = " "  # the whitespace before it ("\n" for a paragraph break of the base)
    kind: str = "base"  # base | edit | junk
    mark: tuple[int, int] | None = None


@dataclass(frozen=True)
class Edit:
    carrier: str  # a CARRIERS template
    better: str  # the adjective of the better response
    worse: str  # the adjective of the worse one


@dataclass
class Response:
    text: str
    key_spans: list[list[int]]  # character spans [start, end) of the edited words in ``text``
    junk_spans: list[list[int]]


def neutral_sentences(text: str) -> list[Piece]:
    """The complete sentences of a sample that hold no lexicon word and no junk character, each with the
    whitespace that preceded it (a line break is kept as a paragraph break)."""
    pieces, end = [], 0
    for m in _SENTENCE.finditer(text):
        gap, end = text[end : m.start()], m.end()
        sentence = m.group().rstrip()
        if not _COMPLETE.search(sentence) or set(words(sentence)) & LEXICON or JUNK_CHARS & set(sentence):
            continue
        pieces.append(Piece(sentence, lead="\n" if "\n" in gap else " "))
    return pieces


def carrier_piece(carrier: str, word: str, kind: str = "edit") -> Piece:
    """A carrier sentence with ``word`` in its slot, marked with the space before it."""
    at = carrier.index("{}")
    return Piece(carrier.format(word), kind=kind, mark=(at - 1, at + len(word)))


def insert(pieces: Sequence[Piece], inserts: Sequence[tuple[int, Piece]]) -> list[Piece]:
    """``pieces`` with each ``(boundary, piece)`` placed before ``pieces[boundary]`` (``len(pieces)``: at the
    end); pieces inserted at the same boundary keep their order."""
    out: list[Piece] = []
    ordered = sorted(inserts, key=lambda x: x[0])
    j = 0
    for i in range(len(pieces) + 1):
        while j < len(ordered) and ordered[j][0] == i:
            out.append(ordered[j][1])
            j += 1
        if i < len(pieces):
            out.append(pieces[i])
    return out


def assemble(pieces: Sequence[Piece]) -> Response:
    """The response text (a continuation: it starts with a space) and the character spans of its marks."""
    text, key, junk = "", [], []
    for p in pieces:
        text += " " if not text else p.lead
        start = len(text)
        text += p.text
        if p.mark is not None:
            (key if p.kind == "edit" else junk).append([start + p.mark[0], start + p.mark[1]])
    return Response(text, key, junk)


def draw_edits(rng: random.Random, n: int, neutral_share: float, first_token: Callable[[str], int]) -> list[Edit]:
    """``n`` edits; the words of each side are distinct, and the two words of an edit start with different
    tokens (``first_token(word)``: the first id of " word")."""
    pools = {name: rng.sample(words_, len(words_)) for name, words_ in
             (("pos", POSITIVE_SLOT_WORDS), ("neg", NEGATIVE_SLOT_WORDS), ("neu", NEUTRAL_SLOT_WORDS))}
    edits = []
    for _ in range(n):
        carrier = rng.choice(CARRIERS)
        if rng.random() < neutral_share:
            better_pool, worse_pool = ("pos", "neu") if rng.random() < 0.5 else ("neu", "neg")
        else:
            better_pool, worse_pool = "pos", "neg"
        better = pools[better_pool].pop()
        worse = next((w for w in reversed(pools[worse_pool]) if first_token(w) != first_token(better)), None)
        if worse is None:
            raise SepoError(f"no {worse_pool} slot word starts with another token than '{better}' in this tokenizer")
        pools[worse_pool].remove(worse)
        edits.append(Edit(carrier, better, worse))
    return edits


# --------------------------------------------------------------------------- pairs


def sample_bases(model, tokenizer, prompts: Sequence[str], per_prompt: int, *, max_new_tokens: int, seed: int,
                 temperature: float = 1.0, batch_size: int = 64) -> list[list[list[Piece]]]:
    """``per_prompt`` neutral base texts per prompt, sampled from ``model``."""
    from sepo.evaluation import generate

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    samples = generate(model, tokenizer, [p for p in ids for _ in range(per_prompt)], max_new_tokens=max_new_tokens,
                       do_sample=True, temperature=temperature, batch_size=batch_size, seed=seed)
    return [[neutral_sentences(samples[i * per_prompt + k][0]) for k in range(per_prompt)]
            for i in range(len(prompts))]


def check_options(*, num_edits: int, neutral_share: float, bt_temperature: float, label_noise: float,
                  max_new_tokens: int) -> None:
    if not 1 <= num_edits <= MAX_EDITS:
        raise ConfigError(f"num_edits must be between 1 and {MAX_EDITS} (got {num_edits})")
    if not 0.0 <= neutral_share <= 1.0:
        raise ConfigError(f"neutral_share must be in [0, 1] (got {neutral_share})")
    if bt_temperature < 0:
        raise ConfigError(f"bt_temperature must be >= 0 (0: labels follow the gold reward exactly; got {bt_temperature})")
    if not 0.0 <= label_noise < 0.5:
        raise ConfigError(f"label_noise must be in [0, 0.5) (got {label_noise})")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")


Decorate = Callable[[random.Random, list[Piece], float], list[Piece]]


def build_pairs(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, label_noise: float, seed: int,
                num_edits: int, neutral_share: float, shared_context: bool, bt_temperature: float,
                gold: Callable[[str], float] = gold_reward, decorate: Decorate | None = None,
                temperature: float = 1.0, batch_size: int = 64):
    """Labelled, tokenized edit pairs (see the module docstring); ``decorate(rng, better_pieces, worse_gold)``
    may add content to the better response (the noisy-chosen task's junk) and returns its pieces."""
    check_options(num_edits=num_edits, neutral_share=neutral_share, bt_temperature=bt_temperature,
                  label_noise=label_noise, max_new_tokens=max_new_tokens)
    bases = sample_bases(model, tokenizer, prompts, 1 if shared_context else 2, max_new_tokens=max_new_tokens,
                         seed=seed, temperature=temperature, batch_size=batch_size)
    first_ids: dict[str, int] = {}

    def first_token(word: str) -> int:
        if word not in first_ids:
            first_ids[word] = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
        return first_ids[word]

    rng = random.Random(seed)
    rows: list[dict] = []
    ties = 0
    for i, prompt in enumerate(prompts):
        base_a, base_b = bases[i][0], bases[i][-1]
        edits = draw_edits(rng, num_edits, neutral_share, first_token)
        at_a = sorted(rng.choices(range(len(base_a) + 1), k=num_edits))
        at_b = at_a if shared_context else sorted(rng.choices(range(len(base_b) + 1), k=num_edits))
        better = insert(base_a, [(b, carrier_piece(e.carrier, e.better)) for b, e in zip(at_a, edits)])
        worse = insert(base_b, [(b, carrier_piece(e.carrier, e.worse)) for b, e in zip(at_b, edits)])
        worse_resp = assemble(worse)
        worse_gold = gold(worse_resp.text)
        # its own stream: what decorate draws (and keeps) cannot shift the draws of the pairs after it
        decorate_rng = random.Random(rng.getrandbits(64))
        if decorate is not None:
            better = decorate(decorate_rng, better, worse_gold)
        better_resp = assemble(better)
        better_gold = gold(better_resp.text)
        draw, noise = rng.random(), rng.random()  # both drawn for every pair: a pair's labels do not shift others'
        if better_gold == worse_gold:
            ties += 1
            continue
        diff = better_gold - worse_gold
        p_better = _sigmoid(diff / bt_temperature) if bt_temperature > 0 else float(diff > 0)
        flipped = noise < label_noise
        better_chosen = (draw < p_better) != flipped
        (c, cg), (r, rg) = ((better_resp, better_gold), (worse_resp, worse_gold)) if better_chosen else \
            ((worse_resp, worse_gold), (better_resp, better_gold))
        rows.append({"index": i, "prompt": prompt, "chosen": c.text, "rejected": r.text,
                     "chosen_key_spans": c.key_spans, "rejected_key_spans": r.key_spans,
                     "chosen_junk_spans": c.junk_spans, "rejected_junk_spans": r.junk_spans,
                     "chosen_gold": cg, "rejected_gold": rg, "label_flipped": flipped})
    if ties:
        log.info("dropped %d pair(s) whose two responses have the same gold reward", ties)
    return tokenized(rows, tokenizer, model, junk=decorate is not None)


def tokenized(rows: list[dict], tokenizer, model, *, junk: bool):
    """The rows as a ``datasets.Dataset`` with the columns of ``sepo data prepare``; refuses pairs longer than
    the model's context."""
    import datasets

    from sepo.data.options import DataOptions
    from sepo.data.tokenize import tokenize_pairs
    from sepo.models import context_limit

    if not rows:
        raise SepoError("no pairs were made (every pair was a tie); use more prompts")
    spans = datasets.List(datasets.List(datasets.Value("int32")))
    features = {"index": datasets.Value("int64"), "prompt": datasets.Value("string"),
                "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
                "chosen_key_spans": spans, "rejected_key_spans": spans}
    if junk:
        features.update(chosen_junk_spans=spans, rejected_junk_spans=spans)
    features.update(chosen_gold=datasets.Value("float32"), rejected_gold=datasets.Value("float32"),
                    label_flipped=datasets.Value("bool"))
    cols = {name: [row[name] for row in rows] for name in features}
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features(features))
    # nothing is cut: a pair that does not fit the model is refused below, with the knob that fixes it
    pairs = tokenize_pairs(ds, tokenizer, DataOptions(chat_template="none", max_length=1 << 30)).dataset
    limit = context_limit(model.config)
    if limit:
        longest = max(len(p) + max(len(c), len(r)) for p, c, r in
                      zip(pairs["prompt_input_ids"], pairs["chosen_input_ids"], pairs["rejected_input_ids"]))
        if longest > limit:
            raise ConfigError(f"a pair is {longest} tokens long, more than the model's {limit} positions; lower "
                              "max_new_tokens (the sampled base) or the sentences inserted into it (num_edits, junk_spans)")
    return pairs


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def make_pairs(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, label_noise: float = 0.0,
               seed: int = 0, num_edits: int = OPTIONS["num_edits"], neutral_share: float = OPTIONS["neutral_share"],
               shared_context: bool = OPTIONS["shared_context"], bt_temperature: float = OPTIONS["bt_temperature"],
               temperature: float = 1.0, batch_size: int = 64):
    """Minimal pairs (``Task.make_pairs``): a ``datasets.Dataset`` with the columns of ``sepo data prepare`` plus
    ``chosen_key_spans``, ``rejected_key_spans`` (character spans of the edited words), ``chosen_gold``,
    ``rejected_gold`` and ``label_flipped``. Pairs whose gold rewards tie are dropped."""
    return build_pairs(model, tokenizer, prompts, max_new_tokens=max_new_tokens, label_noise=label_noise, seed=seed,
                       num_edits=num_edits, neutral_share=neutral_share, shared_context=shared_context,
                       bt_temperature=bt_temperature, temperature=temperature, batch_size=batch_size)


# --------------------------------------------------------------------------- key tokens


def response_offsets(tokenizer, prompt: str, response: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span, in ``response``, of each response id (EOS: an empty span at the end).

    The ids must be the tokenization of the text as ``sepo data prepare`` makes it (``prompt + response``
    encoded at once, or the response alone when the boundary merged), possibly cut from the right."""
    if not getattr(tokenizer, "is_fast", False):
        raise SepoError("locating key tokens needs a fast tokenizer (character offsets); load it with use_fast=True")
    eos = tokenizer.eos_token_id
    body = list(ids[:-1]) if ids and ids[-1] == eos else list(ids)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    if joint["input_ids"][: len(prompt_ids)] == prompt_ids and \
            joint["input_ids"][len(prompt_ids) : len(prompt_ids) + len(body)] == body:
        offsets = [(s - len(prompt), e - len(prompt)) for s, e in joint["offset_mapping"][len(prompt_ids) :]]
    else:
        alone = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        if alone["input_ids"][: len(body)] != body:
            raise DataError("the response ids are not the tokenization of the response text with this tokenizer, so "
                            "its key-token spans cannot be placed on them",
                            hint="pass the tokenizer the pairs were made with")
        offsets = list(alone["offset_mapping"])
    end = len(response)
    return [tuple(o) for o in offsets[: len(body)]] + [(end, end)] * (len(ids) - len(body))


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Sequence[int]], *,
              first_token_only: bool = False) -> list[bool]:
    """True for each token whose character span overlaps one of ``spans``; ``first_token_only``: only the first
    such token of each span."""
    mask = [False] * len(offsets)
    for start, end in spans:
        hits = [i for i, (s, e) in enumerate(offsets) if s < end and start < e and s < e]
        for i in hits[:1] if first_token_only else hits:
            mask[i] = True
    return mask


def side_mask(tokenizer, row, side: str, column: str, *, first_token_only: bool = False) -> list[bool]:
    """The tokens of ``row``'s ``side`` response covered by the spans in ``{side}_{column}``."""
    offsets = response_offsets(tokenizer, row["prompt"], row[side], row[f"{side}_input_ids"])
    return span_mask(offsets, row[f"{side}_{column}"], first_token_only=first_token_only)


def edited_tokens(tokenizer, row, *, first_token_only: bool = False) -> tuple[list[bool], list[bool]]:
    """The tokens of every edited word of a pair, whatever its polarity: ``(chosen_mask, rejected_mask)``. In a
    shared-context pair, taking them out of both responses leaves the same token sequence."""
    return (side_mask(tokenizer, row, "chosen", "key_spans", first_token_only=first_token_only),
            side_mask(tokenizer, row, "rejected", "key_spans", first_token_only=first_token_only))


def key_tokens(tokenizer, row, *, first_token_only: bool = False) -> tuple[list[bool], list[bool]]:
    """The key tokens of a pair (``Task.key_tokens``), by polarity, as in the sentiment task but only at the
    edits: in the chosen response its edited *positive* words (the gold reward rises with them: a top-k selection
    should find them), in the rejected one its edited *negative* words (what a bottom-k selection should find).
    A neutral edited word carries no reward of its own and is a key token on neither side; when a label goes
    against the gold reward (a Bradley-Terry draw or label noise) the chosen side's edits are the worse words, so
    neither side has key tokens."""
    masks = []
    for side, lexicon in (("chosen", POSITIVE_WORDS), ("rejected", NEGATIVE_WORDS)):
        text = row[side]
        spans = [sp for sp in row[f"{side}_key_spans"] if text[sp[0] : sp[1]].strip().lower() in lexicon]
        offsets = response_offsets(tokenizer, row["prompt"], text, row[f"{side}_input_ids"])
        masks.append(span_mask(offsets, spans, first_token_only=first_token_only))
    return masks[0], masks[1]


def without(ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """``ids`` less the masked tokens (a minimal pair less its key tokens: the two sides' shared tokens)."""
    return [t for t, m in zip(ids, mask) if not m]

