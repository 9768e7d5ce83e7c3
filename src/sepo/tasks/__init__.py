"""Preference tasks with known answers: the gold reward and the key tokens of every pair are known, so a
token-level method can be checked against the truth (``sepo demo --task NAME``, ``sepo sweep``).

A task is a :class:`Task`; ``TASKS`` maps its name to it. Every task gives

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


_FACTORIES: dict[str, Callable[[], Task]] = {"sentiment": _sentiment}
TASK_NAMES = tuple(_FACTORIES)


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name lists the known ones."""
    if name not in _FACTORIES:
        raise ConfigError(f"unknown task '{name}'; known tasks: {', '.join(_FACTORIES)}")
    return _FACTORIES[name]()
