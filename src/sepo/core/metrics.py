"""How well token rewards and a token selection find known key tokens (pure torch).

Everything here works on *flat* token vectors: the tokens of many responses laid end to end, ``(T,)``, with
``lengths (N,)`` giving each response's token count (``sum(lengths) == T``), as ``sepo.io.flat_column`` reads
a list column.

* :func:`auroc` -- the probability that a random key token scores higher than a random other token, ties
  counting one half (the Mann-Whitney U statistic divided by ``n_key * n_other``). 0.5 is chance.
* :func:`selection_precision` -- precision and recall of a selection against the key tokens, with the two
  numbers that make a precision readable: its **base rate** (what a random selection of the same number of
  tokens per response gets on average) and its **ceiling** (the best any selection of that many tokens per
  response could get: a response with 2 key tokens and 5 selected ones scores at most 2/5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (True = key token), ties counting 1/2.

    Mann-Whitney: with midranks (tied scores share the mean of their ranks, 1-based, ascending),
    ``U = sum(rank of key tokens) - n1 (n1 + 1) / 2`` and ``AUROC = U / (n1 * n0)``.

    scores (T,) float, labels (T,) bool -> a float in [0, 1]; NaN when either class is empty.
    """
    s = scores.detach().flatten().double()
    y = labels.detach().flatten().bool()
    if s.shape != y.shape:
        raise ValueError(f"{s.numel()} scores for {y.numel()} labels")
    if s.isnan().any():
        raise ValueError("a score is NaN; AUROC needs a total order")
    n1 = int(y.sum())
    n0 = y.numel() - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)  # (D,) groups
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal scores
    midrank = last - (counts.double() - 1) / 2  # (D,)
    u = midrank[inverse][y].sum() - n1 * (n1 + 1) / 2
    return float(u / (n1 * n0))


@dataclass(frozen=True)
class SelectionPrecision:
    """A selection scored against key tokens, pooled over responses. Ratios are NaN where undefined (no
    token selected: precision, base_rate, ceiling; no key token: recall)."""

    precision: float  # key tokens among the selected tokens
    base_rate: float  # expected precision of a random selection of the same number of tokens per response
    ceiling: float  # the best precision any selection of that many tokens per response can reach
    recall: float  # selected key tokens among all key tokens
    key_fraction: float  # key tokens among all tokens
    selected_fraction: float  # selected tokens among all tokens
    tokens: int
    key_tokens: int
    selected_tokens: int


def _per_response(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum of a flat (T,) vector over each response.  -> (N,) float64"""
    row = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)  # (T,) response of each token
    return torch.zeros(lengths.shape[0], dtype=torch.float64).index_add_(0, row, values.double())


def selection_precision(selected: torch.Tensor, key: torch.Tensor, lengths: torch.Tensor) -> SelectionPrecision:
    """Precision, base rate, ceiling and recall of ``selected`` against ``key``.

    With ``n_i`` tokens, ``m_i`` key tokens and ``k_i`` selected tokens in response i:
    precision ``= sum_i tp_i / sum_i k_i``; base rate ``= sum_i k_i m_i / n_i / sum_i k_i`` (a uniformly random
    choice of k_i of the n_i tokens holds k_i m_i / n_i key tokens on average; when k_i is proportional to n_i
    this is the key fraction ``sum m_i / sum n_i``); ceiling ``= sum_i min(k_i, m_i) / sum_i k_i``; recall
    ``= sum_i tp_i / sum_i m_i``.

    selected (T,) bool, key (T,) bool, lengths (N,) long (sum = T) -> SelectionPrecision.
    """
    selected, key = selected.flatten().bool(), key.flatten().bool()
    if not selected.shape == key.shape == (int(lengths.sum()),):
        raise ValueError(f"{selected.numel()} selected and {key.numel()} key entries for {int(lengths.sum())} tokens")
    k = _per_response(selected, lengths)  # (N,)
    m = _per_response(key, lengths)  # (N,)
    n = lengths.double()
    tp = float((selected & key).sum())
    total_k, total_m, total_n = float(k.sum()), float(m.sum()), float(n.sum())
    nan = math.nan
    return SelectionPrecision(
        precision=tp / total_k if total_k else nan,
        base_rate=float((k * m / n.clamp_min(1)).sum()) / total_k if total_k else nan,
        ceiling=float(torch.minimum(k, m).sum()) / total_k if total_k else nan,
        recall=tp / total_m if total_m else nan,
        key_fraction=total_m / total_n if total_n else nan,
        selected_fraction=total_k / total_n if total_n else nan,
        tokens=int(total_n), key_tokens=int(total_m), selected_tokens=int(total_k),
    )
