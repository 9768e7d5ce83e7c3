"""Token-level rewards from an oracle and a reference model, and how concentrated they are.

SePO eq. 6 (from DPO's token-level decomposition, Rafailov et al. 2024 "From r to Q*"):

    r(x, y<t, y_t) = beta * ( log pi_oracle(y_t | x, y<t) - log pi_ref(y_t | x, y<t) )

for every response token t, the first response token and the EOS included (see ``sepo.core.logprobs``).

Concentration (the paper's Figure 1): within one response, rank the tokens by ``|r_t|`` and ask what share of
the response's total ``sum_t |r_t|`` its top x% of tokens carry. The share is a real share: it rises from 0
(no token) to 1 (every token) and never overshoots. :func:`abs_reward_share_curve` gives it for a grid of x,
:func:`token_share_for_abs_reward` the fewest tokens per response that carry a given level (80%), and
:func:`curve_crossing` the x at which a curve averaged over responses first reaches that level.
"""

from __future__ import annotations

import torch

# float rounding slack: a share that reaches ``level`` up to rounding counts as reached, and floor(x * n) of a
# grid point such as 0.3 * 10 = 2.9999999999999996 is 3
_ROUNDING_SLACK = 1e-6


def token_rewards(oracle_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """r_t = beta * (logp_oracle - logp_ref) where ``mask`` is True, 0 elsewhere (SePO eq. 6).

    oracle_logps, reference_logps (N, R) fp32 per-token log-probs; mask (N, R) bool. Returns (N, R) fp32.
    """
    rewards = beta * (oracle_logps.float() - reference_logps.float())  # (N, R)
    return rewards.masked_fill(~mask, 0.0)


def non_finite_rows(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows (indices into N) holding a NaN or inf reward at a real token.  (N, R) -> (K,) long"""
    bad = ~torch.isfinite(rewards) & mask  # (N, R)
    return bad.any(dim=1).nonzero().flatten()


def _sorted_abs_shares(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Share of a response's sum |r_t| held by its j largest |r_t|, for j = 1..R.  -> (N, R), total (N,), n (N,)"""
    magnitude = rewards.float().abs().masked_fill(~mask, 0.0)  # (N, R): padding holds nothing and sorts last
    total = magnitude.sum(dim=1)  # (N,)
    values = magnitude.sort(dim=1, descending=True).values  # (N, R)
    share = values.cumsum(dim=1) / total.clamp_min(torch.finfo(values.dtype).tiny)[:, None]  # (N, R)
    return share, total, mask.sum(dim=1)


def abs_reward_share_curve(rewards: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Share of each response's ``sum_t |r_t|`` carried by its top ``x`` fraction of tokens (ranked by |r_t|),
    for x in ``grid``; the top x fraction is the ``floor(x * n)`` largest, so x = 0 gives 0 and x = 1 gives 1.

    rewards, mask (N, R); grid (G,) in [0, 1] -> (N, G) fp32 in [0, 1], non-decreasing in x; NaN rows where
    ``sum |r| = 0`` (no reward to share out).
    """
    share, total, n = _sorted_abs_shares(rewards, mask)
    padded = torch.cat([torch.zeros_like(share[:, :1]), share], dim=1)  # (N, R + 1): 0 tokens -> 0
    # the slack is relative to n: a float32 grid point such as 0.7 is 0.69999999 and 0.7 * 1000 must still be 700
    size = n[:, None].double()  # (N, 1)
    take = torch.floor(grid[None, :].double() * size + _ROUNDING_SLACK * size.clamp_min(1)).long()  # (N, G)
    curve = padded.gather(1, take.clamp(max=padded.shape[1] - 1)).clamp(max=1.0)  # rounding: never above 1
    return curve.masked_fill(~(total > 0)[:, None], float("nan"))


def token_share_for_abs_reward(rewards: torch.Tensor, mask: torch.Tensor, level: float = 0.8) -> torch.Tensor:
    """The fewest tokens j of each response whose |r_t| (largest first) sum to at least ``level`` of the
    response's ``sum_t |r_t|``, as a share ``j / n`` of its tokens.

    rewards, mask (N, R) -> (N,) fp32 in (0, 1]; NaN where ``sum |r| = 0``.
    """
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    share, total, n = _sorted_abs_shares(rewards, mask)
    reached = share >= level - _ROUNDING_SLACK  # (N, R)
    needed = torch.where(reached.any(dim=1), reached.float().argmax(dim=1) + 1, n)  # (N,) tokens
    return (needed.float() / n.clamp_min(1).float()).masked_fill(~(total > 0), float("nan"))


def curve_crossing(grid: torch.Tensor, curve: torch.Tensor, level: float) -> float | None:
    """The first x of ``grid`` at which a non-decreasing ``curve`` (G,) reaches ``level``; None if it never
    does (or the curve is all NaN)."""
    reached = (curve >= level - _ROUNDING_SLACK).nonzero().flatten()
    return float(grid[reached[0]]) if reached.numel() else None
