"""Token rewards (SePO eq. 6) and the reward-concentration measure (paper Fig. 1), against hand-computed values."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from sepo.core.rewards import (
    concentration,
    concentration_curve,
    non_finite_rows,
    pair_contributions,
    token_rewards,
)


def test_token_rewards_are_beta_times_log_ratio_and_zero_on_padding():
    """beta = 0.1; oracle logps [-1, -2, pad], reference [-1.5, -1, pad]:
    r = 0.1 * [(-1) - (-1.5), (-2) - (-1), 0] = [0.05, -0.1, 0]; second row all padding -> 0."""
    oracle = torch.tensor([[-1.0, -2.0, -7.0], [-3.0, -3.0, -3.0]])
    reference = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert_close(token_rewards(oracle, reference, mask, beta=0.1), torch.tensor([[0.05, -0.1, 0.0], [0.0, 0.0, 0.0]]))


def test_non_finite_rows_ignores_padding():
    rewards = torch.tensor([[0.0, float("nan")], [float("inf"), 1.0], [1.0, float("nan")]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])  # row 2's NaN sits on padding
    assert non_finite_rows(rewards, mask).tolist() == [0, 1]


def test_concentration_share_of_tokens_for_80_percent():
    """chosen rewards [3, 1], rejected rewards [-0.5, 0.5] -> contributions [3, 1, 0.5, -0.5], total 4.
    Sorted cumulative shares: 3/4 = 0.75, 4/4 = 1.0, ... -> 80% needs 2 of 4 tokens = 0.5; 70% needs 1 -> 0.25.
    Second pair: chosen [1], rejected [2] -> difference -1 < 0: no share (NaN, not valid)."""
    chosen = torch.tensor([[3.0, 1.0], [1.0, 0.0]])
    chosen_mask = torch.tensor([[True, True], [True, False]])
    rejected = torch.tensor([[-0.5, 0.5], [2.0, 0.0]])
    rejected_mask = torch.tensor([[True, True], [True, False]])
    contributions, mask = pair_contributions(chosen, chosen_mask, rejected, rejected_mask)
    assert_close(contributions[0], torch.tensor([3.0, 1.0, 0.5, -0.5]))
    share, valid = concentration(contributions, mask, level=0.8)
    assert valid.tolist() == [True, False]
    assert share[0].item() == 0.5 and share[1].isnan()
    assert concentration(contributions, mask, level=0.7)[0][0].item() == 0.25
    assert concentration(contributions, mask, level=1.0)[0][0].item() == 0.5  # 100% reached after 2 tokens


def test_concentration_curve_hand_computed():
    """Same first pair: top 0 tokens -> 0, top 25% (1 token) -> 0.75, top 50% -> 1.0, top 75% -> 1.125
    (the third contribution 0.5 overshoots), all -> 1.0."""
    contributions = torch.tensor([[1.0, 3.0, -0.5, 0.5]])  # order does not matter: sorted inside
    mask = torch.ones_like(contributions, dtype=torch.bool)
    curve = concentration_curve(contributions, mask, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert_close(curve, torch.tensor([[0.0, 0.75, 1.0, 1.125, 1.0]]))


def test_concentration_padding_is_never_counted():
    """One real token of 2.0 plus padding holding garbage 100.0: the share is 1/1, not 1/3."""
    contributions = torch.tensor([[2.0, 100.0, 100.0]])
    mask = torch.tensor([[True, False, False]])
    share, valid = concentration(contributions, mask)
    assert valid.item() and share.item() == 1.0
