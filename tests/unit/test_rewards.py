"""Token rewards (SePO eq. 6) and the reward-concentration measure (paper Fig. 1), against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sepo.core.rewards import (
    abs_reward_share_curve,
    curve_crossing,
    non_finite_rows,
    token_rewards,
    token_share_for_abs_reward,
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


def test_abs_reward_share_curve_hand_computed():
    """Row 0: r = [1, -3, 0.5, -0.5] -> |r| sorted [3, 1, 0.5, 0.5], sum 5, cumulative shares 0.6, 0.8, 0.9, 1.
    Top 0 -> 0; top 25% (1 token) -> 0.6; 50% -> 0.8; 75% -> 0.9; all -> 1. The share never exceeds 1, and a
    negative reward counts by its size. Row 1: all rewards 0 -> nothing to share out: NaN."""
    rewards = torch.tensor([[1.0, -3.0, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.ones_like(rewards, dtype=torch.bool)
    curve = abs_reward_share_curve(rewards, mask, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert_close(curve[0], torch.tensor([0.0, 0.6, 0.8, 0.9, 1.0]))
    assert curve[1].isnan().all()


def test_token_share_for_80_percent_and_the_mean_curve_crossing():
    """Row 0 as above: 80% needs 2 of 4 tokens -> 0.5 (0.6 < 0.8 <= 0.8); 90% -> 0.75; 50% -> 0.25.
    Row 1: r = [2, 2, 0, 0, 0 | padding 9] -> |r| sum 4; one token 0.5, two 1.0 -> 80% needs 2 of 5 -> 0.4.
    Mean curve at x = 0.2 (floor(0.8) = 0 and floor(1.0) = 1 token): (0 + 0.5) / 2 = 0.25; x = 0.4 (1 and 2
    tokens): (0.6 + 1) / 2 = 0.8 -> the mean curve first reaches 80% at x = 0.4."""
    rewards = torch.tensor([[1.0, -3.0, 0.5, -0.5, 0.0], [2.0, 2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    assert_close(token_share_for_abs_reward(rewards, mask, 0.8), torch.tensor([0.5, 0.4]))
    assert_close(token_share_for_abs_reward(rewards, mask, 0.9)[0], torch.tensor(0.75))
    assert_close(token_share_for_abs_reward(rewards, mask, 0.5)[0], torch.tensor(0.25))
    grid = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    mean_curve = abs_reward_share_curve(rewards, mask, grid).mean(0)
    assert_close(mean_curve[:3], torch.tensor([0.0, 0.25, 0.8]))
    assert curve_crossing(grid, mean_curve, 0.8) == pytest.approx(0.4)
    assert curve_crossing(grid, torch.full((6,), float("nan")), 0.8) is None


def test_concentration_padding_is_never_counted():
    """One real token of 2.0 plus padding holding garbage 100.0: the share is 1/1, not 1/3, and one token
    carries all of it."""
    rewards = torch.tensor([[2.0, 100.0, 100.0]])
    mask = torch.tensor([[True, False, False]])
    assert token_share_for_abs_reward(rewards, mask).item() == 1.0
    assert_close(abs_reward_share_curve(rewards, mask, torch.tensor([0.0, 1.0])), torch.tensor([[0.0, 1.0]]))


def test_uniform_rewards_give_the_diagonal():
    """Equal |r|: the top x of the tokens carry exactly x; 80% needs 8 of 10."""
    rewards = torch.tensor([[0.5, -0.5] * 5])
    mask = torch.ones_like(rewards, dtype=torch.bool)
    grid = torch.linspace(0, 1, 11)
    assert_close(abs_reward_share_curve(rewards, mask, grid)[0], grid)
    assert_close(token_share_for_abs_reward(rewards, mask, 0.8), torch.tensor([0.8]))
    # 1000 tokens on a float32 grid: 0.7 is 0.69999999 in float32, and its top 70% is still 700 tokens
    long = torch.ones(1, 1000)
    grid = torch.linspace(0, 1, 101)
    assert_close(abs_reward_share_curve(long, torch.ones_like(long, dtype=torch.bool), grid)[0], grid)
