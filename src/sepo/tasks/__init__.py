"""Preference tasks with known answers: the gold reward and the key tokens of every pair are known, so a
token-level method can be checked against the truth (``sepo demo --task NAME``, ``sepo sweep``).

A task is a :class:`Task`; ``get_task(name)`` returns it and ``TASK_NAMES`` lists the names. Every task gives

* ``prompts(n, seed)`` -- ``n`` distinct prompts, the same for the same seed;
* ``make_pairs(model, tokenizer, prompts, *, max_new_tokens, label_noise, seed, **options)`` -- canonical
  tokenized pairs (a ``datasets.Dataset`` with the columns of ``sepo data prepare``: ``index``, ``prompt``,
  ``chosen``, ``rejected``, ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``; plus
  ``chosen_gold``, ``rejected_gold`` and ``label_flipped``), built from samples of ``model``;
* ``gold_reward`` -- a ``module:function`` reward in the ``sepo eval --reward`` signature
  ``(prompts, completions) -> list[float]``;
* ``key_tokens(tokenizer, row, *, first_token_only=False)`` -- the known key tokens of a pair, *by polarity*:
  ``(chosen_mask, rejected_mask)``, each a list of bools aligned with the response ids. In a chosen response
  the key tokens are those that make it better (what a top-k selection should find), in a rejected one those
  that make it worse (what a bottom-k selection should find). ``first_token_only`` keeps only the first
  token of each key word.

Optional, where a task has them:

* ``avoid_tokens(tokenizer, row, *, first_token_only=False)`` -- tokens a selection should *leave out*, same
  shape as ``key_tokens`` (noisy_chosen: the junk of the chosen response);
* ``oracle_options`` -- ``make_pairs`` options (over ``options``) for the data the oracle should be trained on
  when it differs from the data the policy is trained on: the task is then about out-of-distribution selection
  (``sepo pipeline`` with ``data`` = pairs made with ``oracle_options`` and ``score_data`` = the task's pairs).
  None: the oracle trains on the task's own pairs.

Tasks: ``sentiment`` (independent samples, the demo's default), ``minimal_pairs`` (the two responses differ only
at a few edited words), ``noisy_chosen`` (minimal pairs whose chosen response also carries junk). docs/tasks.md
describes each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sepo.errors import ConfigError

KeyTokens = Callable[..., tuple[list[bool], list[bool]]]


@dataclass(frozen=True)
class Task:
    name: str
    summary: str  # one line, for `--help` and the demo's header
    prompts: Callable[[int, int], list[str]]  # (n, seed) -> n distinct prompts
    make_pairs: Callable[..., Any]  # (model, tokenizer, prompts, *, max_new_tokens, label_noise, seed, **options)
    gold_reward: str  # "module:function", the `sepo eval --reward` signature
    key_tokens: KeyTokens  # (tokenizer, row, *, first_token_only=False) -> (chosen_mask, rejected_mask)
    options: dict[str, Any] = field(default_factory=dict)  # the task's own knobs and their defaults
    avoid_tokens: KeyTokens | None = None  # same signature as key_tokens: tokens a selection should leave out
    oracle_options: dict[str, Any] | None = None  # make_pairs options of the oracle's (in-distribution) data


def _sentiment() -> Task:
    from sepo.tasks import sentiment

    return Task(
        name="sentiment",
        summary="make story continuations happier: the gold reward counts distinct positive minus negative words",
        prompts=lambda n, seed: sentiment.story_prompts(n, seed=seed),
        make_pairs=sentiment.make_preference_pairs,
        gold_reward="sepo.tasks.sentiment:gold_reward_batch",
        key_tokens=sentiment.polarity_key_tokens,
        options={"bt_temperature": 1.0},
    )


def _minimal_pairs() -> Task:
    from sepo.tasks import minimal_pairs, sentiment

    return Task(
        name="minimal_pairs",
        summary="the two responses share every token but a few edited words, which decide the preference",
        prompts=lambda n, seed: sentiment.story_prompts(n, seed=seed),
        make_pairs=minimal_pairs.make_pairs,
        gold_reward="sepo.tasks.sentiment:gold_reward_batch",
        key_tokens=minimal_pairs.key_tokens,
        options=dict(minimal_pairs.OPTIONS),
    )


def _noisy_chosen() -> Task:
    from sepo.tasks import noisy_chosen, sentiment

    return Task(
        name="noisy_chosen",
        summary="minimal pairs whose chosen response also carries junk (repeats, garble, negative words) to avoid",
        prompts=lambda n, seed: sentiment.story_prompts(n, seed=seed),
        make_pairs=noisy_chosen.make_pairs,
        gold_reward="sepo.tasks.noisy_chosen:gold_reward_batch",
        key_tokens=noisy_chosen.key_tokens,
        options={k: list(v) if isinstance(v, list) else v for k, v in noisy_chosen.OPTIONS.items()},
        avoid_tokens=noisy_chosen.avoid_tokens,
        oracle_options={"noise_share": 0.0},
    )


_FACTORIES: dict[str, Callable[[], Task]] = {"sentiment": _sentiment, "minimal_pairs": _minimal_pairs,
                                             "noisy_chosen": _noisy_chosen}
TASK_NAMES = tuple(_FACTORIES)


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name lists the known ones."""
    if name not in _FACTORIES:
        raise ConfigError(f"unknown task '{name}'; known tasks: {', '.join(_FACTORIES)}")
    return _FACTORIES[name]()
