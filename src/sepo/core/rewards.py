"""Token-level rewards from an oracle and a reference model, and how concentrated they are.

SePO eq. 6 (from DPO's token-level decomposition, Rafailov et al. 2024 "From r to Q*"):

    r(x, y<t, y_t) = beta * ( log pi_oracle(y_t | x, y<t) - log pi_ref(y_t | x, y<t) )

for every response token t, the first response token and the EOS included (see ``sepo.core.logprobs``).

The concentration measure is the paper's Figure 1: of the tokens of a pair (chosen and rejected together),
what share accounts for a given fraction (80%) of the pair's reward difference
``sum_t r(chosen_t) - sum_t r(rejected_t)``. A chosen token contributes ``+r_t`` to that difference, a
rejected token ``-r_t``.
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


def pair_contributions(chosen_rewards: torch.Tensor, chosen_mask: torch.Tensor, rejected_rewards: torch.Tensor,
                       rejected_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's contribution to its pair's reward difference: ``+r`` for chosen, ``-r`` for rejected.

    chosen (B, Rc), rejected (B, Rr) rewards and masks -> contributions (B, Rc + Rr), mask (B, Rc + Rr).
    """
    contributions = torch.cat([chosen_rewards, -rejected_rewards], dim=1).masked_fill(
        ~torch.cat([chosen_mask, rejected_mask], dim=1), 0.0)  # (B, L)
    return contributions, torch.cat([chosen_mask, rejected_mask], dim=1)


def _sorted_shares(contributions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cumulative share of the total difference captured by the j largest contributions.  -> (B, L), (B,), (B,)"""
    total = contributions.masked_fill(~mask, 0.0).sum(dim=1)  # (B,)
    # padding sorts last: it must never be counted as one of the "j largest" tokens
    keyed = contributions.masked_fill(~mask, float("-inf"))
    values = keyed.sort(dim=1, descending=True, stable=True).values.masked_fill(
        ~mask.sort(dim=1, descending=True, stable=True).values, 0.0)  # (B, L)
    share = values.cumsum(dim=1) / total.clamp_min(torch.finfo(values.dtype).tiny)[:, None]  # (B, L)
    return share, total, mask.sum(dim=1)


def concentration(contributions: torch.Tensor, mask: torch.Tensor, level: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of a pair's tokens needed to account for ``level`` of its reward difference (paper Fig. 1).

    For each pair, sort the contributions in decreasing order and take the fewest j with
    ``sum_{i<=j} c_(i) >= level * sum_i c_i``; the share is ``j / n`` (n = real tokens of the pair).
    Only pairs with a positive difference (the oracle prefers the chosen response) have a share.

    contributions, mask (B, L) -> share (B,) fp32 (NaN where not defined), valid (B,) bool.
    """
    share_cum, total, n = _sorted_shares(contributions.float(), mask)
    valid = (total > 0) & (n > 0)  # (B,)
    reached = share_cum >= level - _ROUNDING_SLACK  # (B, L)
    first = torch.where(reached.any(dim=1), reached.float().argmax(dim=1) + 1, n)  # (B,) tokens needed
    share = first.float() / n.clamp_min(1).float()
    return share.masked_fill(~valid, float("nan")), valid


def concentration_curve(contributions: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Share of each pair's reward difference captured by its top ``x`` fraction of tokens, for x in ``grid``.

    contributions, mask (B, L); grid (G,) in [0, 1] -> (B, G) fp32 (rows of pairs with a non-positive
    difference are NaN). The top ``x`` fraction is the ``floor(x * n)`` largest contributions.
    """
    share_cum, total, n = _sorted_shares(contributions.float(), mask)
    padded = torch.cat([torch.zeros_like(share_cum[:, :1]), share_cum], dim=1)  # (B, L + 1): 0 tokens -> 0
    take = torch.floor(grid[None, :].float() * n[:, None].float() + _ROUNDING_SLACK).long()  # (B, G)
    curve = padded.gather(1, take.clamp(max=padded.shape[1] - 1))
    return curve.masked_fill(~((total > 0) & (n > 0))[:, None], float("nan"))
