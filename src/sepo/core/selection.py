"""Key-token selection over padded (N, R) batches of token rewards.

Every function takes ``rewards`` (N, R) float and ``mask`` (N, R) bool (True = a real response token) and a
``side``: ``"chosen"`` keeps high-reward tokens, ``"rejected"`` keeps low-reward ones (SePO section 3.2:
the key tokens of a dispreferred response are those the oracle penalises most). Each returns a (N, R) bool
selection that is False on padding. All work is vectorized over rows (sort / cumsum / compare); there is no
Python loop over tokens.

- ``select_ratio``: the paper's rule, the ``floor(k * n)`` best tokens of each response, at least one when
  k > 0, ties broken by position (the earlier token wins), so the result is deterministic.
- ``select_threshold``: r > tau (chosen) or r < -tau (rejected); ``magnitude_quantile`` sets tau from data.
- ``select_mass``: the fewest tokens whose rewards cover a fraction p of the response's positive (chosen)
  or negative (rejected) reward mass: an adaptive k.

``soft_weights`` is the soft counterpart: a float weight in [0, 1] per token instead of a yes/no (``clip``:
the oriented reward over a scale, clipped; ``softmax``: a temperature softmax within the response, scaled so
the best token weighs 1).
"""

from __future__ import annotations

import math

import torch

SIDES = ("chosen", "rejected")
WEIGHTINGS = ("hard", "clip", "softmax")  # hard: the selection itself as 0/1 weights
# floor(k * n) in floating point turns 0.29 * 100 = 28.999999999999996 into 28; this slack restores 29.
_FLOOR_SLACK = 1e-9


def _oriented(rewards: torch.Tensor, side: str) -> torch.Tensor:
    """Rewards with the sign flipped for the rejected side, so "best" is always "largest"."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return rewards if side == "chosen" else -rewards


def num_selected(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens kept per response by the ratio rule: ``max(1, floor(ratio * n))`` when ratio > 0 and n > 0.

    lengths (N,) long -> (N,) long, never above n.  e.g. ratio 0.3: n = 10 -> 3, n = 3 -> 1 (0.9 floors to 0,
    raised to one), n = 1 -> 1, n = 0 -> 0; ratio 0 -> 0 everywhere; ratio 1 -> n.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    k = torch.floor(lengths.double() * ratio + _FLOOR_SLACK).long()  # (N,)
    if ratio > 0:
        k = torch.maximum(k, torch.ones_like(k))
    return torch.minimum(k, lengths).clamp_min(0)


def _rank_by_position(keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable descending sort of ``keys`` with padding last: (sorted values, original positions)."""
    keyed = keys.masked_fill(~mask, float("-inf"))
    # stable=True keeps equal keys in position order, so among ties the earlier token ranks first;
    # padding is -inf and sorts after every real token (a real -inf would already have been refused)
    values, order = keyed.sort(dim=1, descending=True, stable=True)  # (N, R)
    return values, order


def _scatter_first(order: torch.Tensor, keep_sorted: torch.Tensor) -> torch.Tensor:
    """Selection in sorted order -> selection in original positions.  (N, R) -> (N, R) bool"""
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def select_ratio(rewards: torch.Tensor, mask: torch.Tensor, ratio: float, side: str) -> torch.Tensor:
    """The ``num_selected(n, ratio)`` highest-reward (chosen) / lowest-reward (rejected) tokens per row.

    rewards (N, R), mask (N, R) -> (N, R) bool.
    """
    k = num_selected(mask.sum(dim=1), ratio)  # (N,)
    _, order = _rank_by_position(_oriented(rewards, side), mask)  # (N, R)
    ranks = torch.arange(rewards.shape[1], device=rewards.device)[None, :]  # (1, R)
    return _scatter_first(order, ranks < k[:, None]) & mask


def select_threshold(rewards: torch.Tensor, mask: torch.Tensor, tau: float, side: str) -> torch.Tensor:
    """r > tau (chosen) or r < -tau (rejected).  (N, R) -> (N, R) bool"""
    return (_oriented(rewards, side) > tau) & mask


def select_mass(rewards: torch.Tensor, mask: torch.Tensor, fraction: float, side: str) -> torch.Tensor:
    """The fewest tokens whose rewards cover ``fraction`` of the row's positive (chosen) or negative
    (rejected) reward mass ``M = sum_t max(s * r_t, 0)`` (s = +1 chosen, -1 rejected).

    Tokens are taken best first (ties by position) while the mass taken *before* the token is still below
    ``fraction * M``. A row with M = 0 (no token pushes the right way) selects nothing.
    rewards (N, R), mask (N, R) -> (N, R) bool.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mass fraction must be in [0, 1], got {fraction}")
    values, order = _rank_by_position(_oriented(rewards, side), mask)  # (N, R)
    gains = values.clamp_min(0.0)  # (N, R): -inf padding and non-positive tokens add nothing
    covered = gains.cumsum(dim=1)  # (N, R)
    before = covered - gains  # mass taken before each token
    target = fraction * covered[:, -1:]  # (N, 1): the row's total mass M is the last cumulative sum
    return _scatter_first(order, before < target) & mask


def magnitude_quantile(rewards: torch.Tensor, q: float) -> float:
    """The q-quantile (linear interpolation, like ``torch.quantile``) of |r| over a flat tensor of rewards.

    ``torch.quantile`` refuses inputs above 16M elements; ``kthvalue`` has no such limit and is linear time.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    flat = rewards.detach().abs().flatten().double()
    if flat.numel() == 0:
        return 0.0
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = flat.kthvalue(lo + 1).values.item()
    v_hi = v_lo if hi == lo else flat.kthvalue(hi + 1).values.item()
    return v_lo + (v_hi - v_lo) * (pos - lo)


def soft_weights(rewards: torch.Tensor, mask: torch.Tensor, method: str, scale: float, side: str) -> torch.Tensor:
    """Per-token weights in [0, 1] from the oriented reward ``s_t = r_t`` (chosen) or ``-r_t`` (rejected):

        clip:     w_t = clip(s_t / scale, 0, 1)              tokens pushing the wrong way weigh 0, beyond scale 1
        softmax:  w_t = exp((s_t - max_u s_u) / scale)        = softmax(s / scale)_t / max softmax: the best token
                                                                 weighs 1, scale is the temperature

    As ``scale -> 0`` softmax becomes one-hot on the best token (ties: every tied token weighs 1).
    rewards (N, R), mask (N, R) bool -> (N, R) float32, 0 on padding.
    """
    if not scale > 0:
        raise ValueError(f"the weight scale must be > 0 (it divides the rewards), got {scale}")
    oriented = _oriented(rewards.float(), side)
    if method == "clip":
        weights = (oriented / scale).clamp(0.0, 1.0)
    elif method == "softmax":
        best = oriented.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # (N, 1)
        # a row of padding only has best = -inf: its (inf) weights are all overwritten by the mask below
        weights = torch.exp((oriented - best) / scale)
    else:
        raise ValueError(f"unknown soft weighting {method!r}; choose clip or softmax")
    return weights.masked_fill(~mask, 0.0)


def select(rewards: torch.Tensor, mask: torch.Tensor, strategy: str, value: float, side: str) -> torch.Tensor:
    """Dispatch on ``strategy`` (ratio: value = k; threshold: value = tau; mass: value = p)."""
    functions = {"ratio": select_ratio, "threshold": select_threshold, "mass": select_mass}
    if strategy not in functions:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(functions)}")
    return functions[strategy](rewards, mask, value, side)
