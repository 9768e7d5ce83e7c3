"""Reward-KL frontier statistics (sepo.core.frontier) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from sepo.core.frontier import (
    AtBudget,
    Run,
    bootstrap,
    differences,
    interval,
    method_points,
    nested_bootstrap_mean,
    pareto_front,
    value_at_budget,
    values_at_budgets,
    verdicts,
)


def test_pareto_front_keeps_the_points_nothing_beats():
    """(KL, reward) points (0.5, 0.2) (1, 0.5) (2, 0.4) (3, 0.9) (3, 0.7) (0.2, 0.1):
    (2, 0.4) is beaten by (1, 0.5); (3, 0.7) by (3, 0.9); the rest each beat everything at lower KL."""
    points = [(0.5, 0.2), (1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (3.0, 0.7), (0.2, 0.1)]
    assert pareto_front(points) == [(0.2, 0.1), (0.5, 0.2), (1.0, 0.5), (3.0, 0.9)]


def test_pareto_front_counts_negative_kl_as_zero_and_skips_non_finite_points():
    """(-0.01, 0.3) is Monte-Carlo noise around KL 0 -> (0, 0.3); (0, 0.2) is beaten by it; NaN points drop."""
    assert pareto_front([(-0.01, 0.3), (0.0, 0.2), (float("nan"), 5.0), (1.0, float("inf")), (2.0, 0.6)]) == [
        (0.0, 0.3), (2.0, 0.6)]


def test_value_at_budget_interpolates_linearly_along_the_front():
    """Front (0, 0.3) (2, 0.7) (6, 0.9).
    Budget 1: 0.3 + (0.7 - 0.3) * (1 - 0) / (2 - 0) = 0.5.
    Budget 3: 0.7 + (0.9 - 0.7) * (3 - 2) / (6 - 2) = 0.75.
    Budget 2 (on a point): 0.7.  Budget 6: 0.9, reached.
    Budget 10: past the last point: 0.9, not reached (no extrapolation)."""
    front = [(0.0, 0.3), (2.0, 0.7), (6.0, 0.9)]
    got = [value_at_budget(front, b) for b in (1, 3, 2, 6, 10)]
    expected = [0.5, 0.75, 0.7, 0.9, 0.9]
    np.testing.assert_allclose([g.value for g in got], expected)
    assert [g.reached for g in got] == [True, True, True, True, False]


def test_value_at_budget_below_the_first_point_has_no_value():
    """Front starting at KL 2 (no reference point): nothing is reachable within 1 nat."""
    assert value_at_budget([(2.0, 0.7)], 1.0) == AtBudget(None, True)
    assert value_at_budget([], 1.0) == AtBudget(None, False)


def test_values_at_budgets_put_the_reference_at_kl_zero_on_every_front():
    """Method a: one point (4, 1.0); reference reward 0.2 at KL 0.
    Budget 1: 0.2 + (1.0 - 0.2) * 1 / 4 = 0.4; budget 4: 1.0; budget 10: 1.0, front ends below."""
    out = values_at_budgets({"a": [(4.0, 1.0)]}, [1, 4, 10], baseline=0.2)
    np.testing.assert_allclose([v.value for v in out["a"]], [0.4, 1.0, 1.0])
    assert [v.reached for v in out["a"]] == [True, True, False]


def _run(method, strength, seed, reward, kl):
    return Run(method, strength, seed, np.asarray(reward, float), np.asarray(kl, float))


def test_method_points_average_prompts_then_seeds():
    """Strength lr1, seed 0: prompts rewards (1, 3) -> 2, KL (1, 1) -> 1; seed 1: rewards (3, 5) -> 4, KL (2, 4) -> 3.
    Mean over seeds: (KL 2, reward 3). Seed weights {0: 2, 1: 0} (seed 0 drawn twice): (1, 2).
    Prompt weights (2, 0): seed 0 -> (1, 1), seed 1 -> (2, 3); mean (1.5, 2)."""
    runs = [_run("a", "lr1", 0, [1, 3], [1, 1]), _run("a", "lr1", 1, [3, 5], [2, 4])]
    assert method_points(runs) == {"a": [(2.0, 3.0)]}
    assert method_points(runs, seed_weights={0: 2, 1: 0}) == {"a": [(1.0, 2.0)]}
    assert method_points(runs, prompt_weights=np.array([2.0, 0.0])) == {"a": [(1.5, 2.0)]}


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory():
    """One method, one strength, one seed, KL 0 everywhere: its value at any budget is the mean reward of P
    prompts. With rewards drawn N(0, 1), P = 400, the bootstrap 95% CI of a mean is about
    mean +- 1.96 * s / sqrt(P) = mean +- 0.098 (s the sample standard deviation)."""
    rng = np.random.default_rng(1)
    reward = rng.normal(0.0, 1.0, 400)
    boot = bootstrap([_run("a", "lr", 0, reward, np.zeros(400))], [1.0], n_resamples=4000, seed=0)
    assert boot.estimate["a"][0].value == pytest.approx(reward.mean())
    low, high = interval(boot.samples[:, 0, 0])
    half = 1.96 * reward.std(ddof=1) / np.sqrt(400)
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert (low + high) / 2 == pytest.approx(reward.mean(), abs=0.02)


def test_bootstrap_is_paired_over_prompts_and_seeds():
    """b's rewards are a's plus exactly 0.1 on every prompt and seed, at the same KL: whatever prompts and seeds a
    resample draws, b - a is 0.1 (the prompt noise, large next to 0.1, cancels), so the difference's CI is
    [0.1, 0.1] and b is significantly best. An unpaired comparison could not separate them."""
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1, 2):
        reward, kl = rng.normal(0, 1, 50), rng.uniform(0.5, 1.5, 50)
        runs += [_run("a", "lr", seed, reward, kl), _run("b", "lr", seed, reward + 0.1, kl)]
    boot = bootstrap(runs, [5.0], n_resamples=300, seed=0)
    diff = boot.samples[:, 1, 0] - boot.samples[:, 0, 0]
    np.testing.assert_allclose(diff, 0.1, atol=1e-9)
    (v,) = verdicts(boot)
    assert v.best == "b" and v.significant and v.tied == []
    assert v.differences["a"] == pytest.approx((0.1, 0.1))


def test_verdict_says_not_significant_when_two_methods_are_the_same():
    """a and b identical: the difference is 0 in every resample, so its CI [0, 0] contains 0."""
    rng = np.random.default_rng(0)
    reward, kl = rng.normal(0, 1, 30), rng.uniform(0, 2, 30)
    runs = [_run("a", "lr", 0, reward, kl), _run("b", "lr", 0, reward, kl)]
    (v,) = verdicts(bootstrap(runs, [3.0], baseline=np.zeros(30), n_resamples=100))
    assert not v.significant and v.tied and v.text.startswith("not significant")


def test_a_method_without_seeds_in_a_resample_keeps_its_other_strengths():
    """Strength s2 has only seed 1; a resample drawing seed 0 twice drops s2 and keeps s1."""
    runs = [_run("a", "s1", 0, [1.0], [1.0]), _run("a", "s1", 1, [1.0], [1.0]), _run("a", "s2", 1, [2.0], [2.0])]
    assert method_points(runs, seed_weights={0: 2, 1: 0}) == {"a": [(1.0, 1.0)]}


def test_runs_over_different_prompts_are_refused():
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap([_run("a", "s", 0, [1.0, 2.0], [0.0, 0.0]), _run("b", "s", 0, [1.0], [0.0])], [1.0])


def test_differences_are_paired_and_flag_a_front_that_ends_below_the_budget():
    """b = a + 0.1 on every prompt and seed, both at KL 1: at budget 5 the difference b - a is 0.1 in every
    resample, CI [0.1, 0.1], and both fronts end below 5 (the values are their strongest points': reached False).
    At budget 0.5 the fronts (0, base) -> (1, r) give base + 0.5 (r - base) each: the difference is 0.05."""
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):
        reward = rng.normal(0, 1, 30)
        runs += [_run("a", "lr", seed, reward, np.ones(30)), _run("b", "lr", seed, reward + 0.1, np.ones(30))]
    boot = bootstrap(runs, [0.5, 5.0], baseline=np.full(30, -3.0), n_resamples=200, seed=0)
    half, five = differences(boot, [("b", "a")])
    assert (five.a, five.b, five.budget, five.reached) == ("b", "a", 5.0, False)
    assert (five.value, five.low, five.high) == pytest.approx((0.1, 0.1, 0.1))
    assert half.reached and (half.value, half.low, half.high) == pytest.approx((0.05, 0.05, 0.05))


def test_nested_bootstrap_of_constant_groups_resamples_the_groups():
    """Groups of constant values 1 and 3: estimate 2. A resample draws two groups with replacement: mean 1 with
    probability 1/4, 2 with 1/2, 3 with 1/4 -- so the 2.5% and 97.5% percentiles are 1 and 3."""
    assert nested_bootstrap_mean([np.ones(5), np.full(7, 3.0)], n_resamples=2000) == pytest.approx((2.0, 1.0, 3.0))


def test_nested_bootstrap_of_one_group_is_the_bootstrap_of_its_mean():
    """One group of 100 values, half 0 and half 1 (NaN ignored): mean 0.5, standard error 0.5 / sqrt(100) = 0.05,
    so the 95% CI is about 0.5 +- 1.96 * 0.05 = [0.402, 0.598]."""
    values = np.array([0.0, 1.0] * 50 + [np.nan])
    estimate, low, high = nested_bootstrap_mean([values], n_resamples=4000, seed=1)
    assert estimate == 0.5
    assert (low, high) == pytest.approx((0.402, 0.598), abs=0.015)
    with pytest.raises(ValueError, match="finite"):
        nested_bootstrap_mean([values, np.array([np.nan])])


def test_a_starred_contrast_stands_for_every_other_method_against_the_named_one():
    from sepo.stages.sweep import expand_contrasts

    curves = ["dpo", "simpo", "sepo"]
    assert expand_contrasts(["* - dpo"], curves) == ["simpo - dpo", "sepo - dpo"]
    assert expand_contrasts(["sepo - *", "sepo - dpo"], curves) == ["sepo - dpo", "sepo - simpo"]
