"""Key-token selection: hand-computed cases and a brute-force per-response reference on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sepo.core.selection import (
    magnitude_quantile,
    num_selected,
    select,
    select_mass,
    select_ratio,
    select_threshold,
    soft_weights,
)


def test_num_selected_floor_with_at_least_one():
    """ratio 0.3: n=10 -> 3, n=3 -> floor(0.9)=0 raised to 1, n=1 -> 1, n=0 -> 0; 0.29 * 100 -> 29 (not 28);
    ratio 0 -> 0; ratio 1 -> n."""
    n = torch.tensor([10, 3, 1, 0])
    assert num_selected(n, 0.3).tolist() == [3, 1, 1, 0]
    assert num_selected(torch.tensor([100]), 0.29).tolist() == [29]
    assert num_selected(n, 0.0).tolist() == [0, 0, 0, 0]
    assert num_selected(n, 1.0).tolist() == [10, 3, 1, 0]


def test_ratio_hand_computed_with_ties_broken_by_position():
    """rewards [1, 3, 3, -2, 0] (n = 5), k = 0.4 -> 2 tokens.
    chosen keeps the two largest: 3 at position 1 and 3 at position 2.
    rejected keeps the two smallest: -2 (pos 3) and 0 (pos 4).
    k = 0.2 -> 1 token: chosen the FIRST of the tied 3s (position 1)."""
    r = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.0, 9.0]])
    m = torch.tensor([[True, True, True, True, True, False]])  # position 5 is padding holding 9.0
    assert select_ratio(r, m, 0.4, "chosen").tolist() == [[False, True, True, False, False, False]]
    assert select_ratio(r, m, 0.4, "rejected").tolist() == [[False, False, False, True, True, False]]
    assert select_ratio(r, m, 0.2, "chosen").tolist() == [[False, True, False, False, False, False]]
    assert select_ratio(r, m, 1.0, "chosen").tolist() == m.tolist()
    assert not select_ratio(r, m, 0.0, "rejected").any()


def test_one_token_and_empty_responses():
    r = torch.tensor([[-5.0, 0.0], [0.0, 0.0]])
    m = torch.tensor([[True, False], [False, False]])
    assert select_ratio(r, m, 0.01, "chosen").tolist() == [[True, False], [False, False]]
    assert select_mass(r, m, 0.5, "rejected").tolist() == [[True, False], [False, False]]
    assert not select_mass(r, m, 0.5, "chosen").any()  # no positive reward mass -> empty selection


def test_threshold_hand_computed():
    """tau = 0.5: chosen keeps r > 0.5 -> [0.6, 2.0]; rejected keeps r < -0.5 -> [-0.7] (not -0.5 itself)."""
    r = torch.tensor([[0.6, 0.5, -0.5, -0.7, 2.0]])
    m = torch.ones_like(r, dtype=torch.bool)
    assert select_threshold(r, m, 0.5, "chosen").tolist() == [[True, False, False, False, True]]
    assert select_threshold(r, m, 0.5, "rejected").tolist() == [[False, False, False, True, False]]


def test_mass_hand_computed():
    """chosen rewards [1, 4, -2, 3, 2]: positive mass M = 10. p = 0.5 -> target 5: take 4 (before 0 < 5),
    3 (before 4 < 5), stop (before 7 >= 5) -> positions 1, 3. p = 1 -> all four positive tokens, never -2.
    Rejected side on the same rewards: negative mass 2 -> only the -2 token."""
    r = torch.tensor([[1.0, 4.0, -2.0, 3.0, 2.0]])
    m = torch.ones_like(r, dtype=torch.bool)
    assert select_mass(r, m, 0.5, "chosen").tolist() == [[False, True, False, True, False]]
    assert select_mass(r, m, 1.0, "chosen").tolist() == [[True, True, False, True, True]]
    assert select_mass(r, m, 0.0, "chosen").tolist() == [[False] * 5]
    assert select_mass(r, m, 0.3, "rejected").tolist() == [[False, False, True, False, False]]


def test_magnitude_quantile_matches_torch_quantile():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.3, 0.7, 1.0):
        assert magnitude_quantile(x, q) == pytest.approx(torch.quantile(x.abs().double(), q).item(), rel=1e-9)


def test_soft_weights_by_hand():
    """rewards [0.2, -0.1, 0.05, x=9], scale 0.1.
    clip, chosen: clip([2, -1, 0.5], 0, 1) = [1, 0, 0.5]; rejected (s = -r): clip([-2, 1, -0.5]) = [0, 1, 0].
    softmax, chosen: exp(([0.2, -0.1, 0.05] - 0.2) / 0.1) = [1, e^-3, e^-1.5];
             rejected: s = [-0.2, 0.1, -0.05], max 0.1: [e^-3, 1, e^-1.5]. Padding weighs 0."""
    r = torch.tensor([[0.2, -0.1, 0.05, 9.0]])
    m = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(soft_weights(r, m, "clip", 0.1, "chosen"), torch.tensor([[1.0, 0.0, 0.5, 0.0]]))
    torch.testing.assert_close(soft_weights(r, m, "clip", 0.1, "rejected"), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    e = math.exp
    torch.testing.assert_close(soft_weights(r, m, "softmax", 0.1, "chosen"), torch.tensor([[1.0, e(-3), e(-1.5), 0.0]]))
    torch.testing.assert_close(soft_weights(r, m, "softmax", 0.1, "rejected"),
                               torch.tensor([[e(-3), 1.0, e(-1.5), 0.0]]))


def test_cold_softmax_weights_are_the_one_token_hard_selection():
    """As the temperature goes to 0 the softmax weights become exactly the best token: the ratio rule keeping one
    token (distinct rewards, so no ties), as 0/1 floats; an all-padding row weighs 0 everywhere."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 8, generator=g)
    m = torch.arange(8)[None] < torch.tensor([8, 3, 1, 5, 0])[:, None]
    for side in ("chosen", "rejected"):
        hard = select_ratio(r, m, 1e-9, side)  # k = max(1, floor(1e-9 n)) = 1 token per non-empty response
        assert torch.equal(soft_weights(r, m, "softmax", 1e-6, side), hard.float())


def test_bad_arguments_are_refused():
    r, m = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="side"):
        select(r, m, "ratio", 0.3, "both")
    with pytest.raises(ValueError, match="strategy"):
        select(r, m, "topk", 0.3, "chosen")
    with pytest.raises(ValueError, match="ratio"):
        select(r, m, "ratio", 1.5, "chosen")
    with pytest.raises(ValueError, match="scale"):
        soft_weights(r, m, "clip", 0.0, "chosen")
    with pytest.raises(ValueError, match="soft weighting"):
        soft_weights(r, m, "tanh", 1.0, "chosen")


# ------------------------------------------------------------------ brute force on random inputs


def brute_force(rewards: list[float], strategy: str, value: float, side: str) -> list[bool]:
    """One response, plain Python: the rule as written in docs/select.md."""
    n = len(rewards)
    s = [x if side == "chosen" else -x for x in rewards]
    order = sorted(range(n), key=lambda i: (-s[i], i))  # best first, earlier position on ties
    keep = set()
    if strategy == "ratio":
        k = math.floor(value * n + 1e-9)
        k = min(max(k, 1) if value > 0 and n > 0 else k, n)
        keep = set(order[:k])
    elif strategy == "threshold":
        keep = {i for i in range(n) if s[i] > value}
    else:
        total = sum(max(x, 0.0) for x in s)
        taken = 0.0
        for i in order:
            if taken < value * total:
                keep.add(i)
                taken += max(s[i], 0.0)
    return [i in keep for i in range(n)]


# quarter steps are exact in float32, so sums and comparisons agree bit for bit with the reference (and tie often)
rewards_st = st.lists(st.integers(-12, 12).map(lambda v: v / 4), min_size=0, max_size=12)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(rewards_st, min_size=1, max_size=6),
       strategy=st.sampled_from(["ratio", "threshold", "mass"]),
       value=st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0]),
       side=st.sampled_from(["chosen", "rejected"]))
def test_vectorized_selection_equals_brute_force(rows, strategy, value, side):
    if strategy == "mass" and value not in (0.0, 0.25, 0.5, 0.75, 1.0):
        value = 0.5  # keep p * M exact in binary, as the quarter-step rewards are
    width = max(len(r) for r in rows) + 1
    rewards = torch.full((len(rows), width), 7.5)  # padding holds a large value that must never be selected
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        rewards[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    got = select(rewards, mask, strategy, value, side)
    assert not got[~mask].any()
    for i, r in enumerate(rows):
        assert got[i, : len(r)].tolist() == brute_force(r, strategy, value, side), (r, strategy, value, side)
