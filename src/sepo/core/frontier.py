"""Reward–KL frontiers: Pareto fronts, the best reward within a KL budget, and a paired bootstrap over seeds and
prompts. Pure numpy: no models, no files (``sepo sweep`` reads its points and calls these).

A method trained at several strengths (learning rates, epochs, β, …) traces points (KL, reward): KL(π‖π_ref)
in nats per sample on the policy's own samples, and the mean reward of those samples. One point per method
compares nothing — a stronger update buys reward with KL. What can be compared is the best reward each method
reaches *within the same KL budget* (the reward–KL frontier of Rafailov et al. 2023, Fig. 2, and Gao et al.
2023, "Scaling laws for reward model overoptimization").

* :func:`pareto_front` — the points no other point beats (lower or equal KL and higher reward).
* :func:`value_at_budget` — the best reward at KL <= budget, **linear** between consecutive front points.
  Linear in KL because the segment is attainable: the mixture policy that answers with policy a with
  probability p (a whole response each time) earns p·r_a + (1−p)·r_b at a KL of at most p·KL_a + (1−p)·KL_b
  (KL is jointly convex). Past the front's last point nothing is extrapolated: the value is the last point's
  reward and ``reached`` is False.
* :func:`bootstrap` — percentile confidence intervals, resampling seeds and prompts *paired*: each resample
  draws one multiset of seeds and one of prompts and applies it to every method, so the paired difference of
  two methods' values cancels what they share (the prompts, the seed's data order). :func:`verdicts` names
  the best method at each budget, or says that its lead is not significant (the CI of a paired difference
  contains 0); :func:`differences_from` gives every method's paired difference with one baseline method.

Every method's points include the reference (the untrained policy) at KL 0: the front starts there.
KL estimates below 0 (Monte-Carlo noise around a policy that barely moved) count as 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Point = tuple[float, float]  # (kl, reward)


# --------------------------------------------------------------------------- fronts and budgets


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points, by increasing KL: each has a higher reward than every point of lower or equal
    KL. Non-finite points are ignored; a negative KL counts as 0."""
    clean = sorted(((max(float(k), 0.0), float(r)) for k, r in points if math.isfinite(k) and math.isfinite(r)),
                   key=lambda p: (p[0], -p[1]))
    front: list[Point] = []
    for kl, reward in clean:
        if not front or reward > front[-1][1]:
            front.append((kl, reward))
    return front


@dataclass(frozen=True)
class AtBudget:
    value: float | None  # best reward at KL <= budget along the front; None: no point within the budget
    reached: bool  # the front reaches the budget; False: it ends below it and value is its last point's reward


def value_at_budget(front: Sequence[Point], budget: float) -> AtBudget:
    """The best reward within ``budget`` nats along ``front`` (as :func:`pareto_front` returns it), linear
    between consecutive points; no extrapolation beyond the last point."""
    if not front or front[0][0] > budget:
        return AtBudget(None, bool(front))
    for (k0, r0), (k1, r1) in zip(front, front[1:]):
        if k1 >= budget:
            return AtBudget(r0 + (r1 - r0) * (budget - k0) / (k1 - k0), True)
    kl, reward = front[-1]
    return AtBudget(reward, kl >= budget)


# --------------------------------------------------------------------------- runs: per-prompt data of each point


@dataclass
class Run:
    """One trained point: its method, strength (a label of its axis values), training seed, and per held-out
    prompt the reward of its sample and the KL of that sample (the same prompts, in the same order, for every
    run)."""

    method: str
    strength: str
    seed: int
    reward: np.ndarray  # (P,)
    kl: np.ndarray  # (P,)


def _check(runs: Sequence[Run], baseline: np.ndarray | None) -> int:
    sizes = {len(r.reward) for r in runs} | {len(r.kl) for r in runs} | ({len(baseline)} if baseline is not None else set())
    if len(sizes) != 1:
        raise ValueError(f"every run needs one reward and one KL per prompt, for the same prompts (got lengths {sizes})")
    (size,) = sizes
    if size == 0:
        raise ValueError("no prompts")
    return size


def method_points(runs: Sequence[Run], *, prompt_weights: np.ndarray | None = None,
                  seed_weights: Mapping[int, float] | None = None) -> dict[str, list[Point]]:
    """method -> one (KL, reward) per strength: the mean over seeds of the mean over prompts (weighted: the
    bootstrap's resampling counts; a strength none of whose seeds has weight is left out)."""
    by_strength: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in runs:
        w = 1.0 if seed_weights is None else float(seed_weights.get(r.seed, 0.0))
        if prompt_weights is None:
            kl, reward = float(np.mean(r.kl)), float(np.mean(r.reward))
        else:
            total = float(prompt_weights.sum())
            kl, reward = float(prompt_weights @ r.kl) / total, float(prompt_weights @ r.reward) / total
        by_strength.setdefault((r.method, r.strength), []).append((w, kl, reward))
    out: dict[str, list[Point]] = {}
    for (method, _), entries in by_strength.items():
        out.setdefault(method, [])
        total = sum(w for w, _, _ in entries)
        if total > 0:
            out[method].append((sum(w * k for w, k, _ in entries) / total, sum(w * r for w, _, r in entries) / total))
    return out


def values_at_budgets(points: Mapping[str, Sequence[Point]], budgets: Sequence[float],
                      baseline: float | None) -> dict[str, list[AtBudget]]:
    """method -> its value at each budget, the baseline (the reference's reward, at KL 0) on every front."""
    start = [(0.0, baseline)] if baseline is not None else []
    return {m: [value_at_budget(pareto_front([*start, *pts]), b) for b in budgets] for m, pts in points.items()}


# --------------------------------------------------------------------------- the paired bootstrap


@dataclass
class Bootstrap:
    methods: list[str]
    budgets: list[float]
    estimate: dict[str, list[AtBudget]]  # on the data as measured
    samples: np.ndarray  # (n_resamples, methods, budgets); NaN where a resample has no value
    seeds: list[int] = field(default_factory=list)
    num_prompts: int = 0


def bootstrap(runs: Sequence[Run], budgets: Sequence[float], *, baseline: np.ndarray | None = None,
              n_resamples: int = 1000, seed: int = 0) -> Bootstrap:
    """Values at ``budgets`` for every method, and their distribution under paired resampling: each resample
    draws seeds (from the runs' seeds) and prompts with replacement, the same draw for every method; the
    reference's per-prompt rewards (``baseline``) are resampled with the same prompts."""
    num_prompts = _check(runs, baseline)
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = sorted({r.seed for r in runs})
    base = float(np.mean(baseline)) if baseline is not None else None
    estimate = values_at_budgets(method_points(runs), budgets, base)
    rng = np.random.default_rng(seed)
    samples = np.full((n_resamples, len(methods), len(budgets)), np.nan)
    for b in range(n_resamples):
        prompt_weights = np.bincount(rng.integers(0, num_prompts, num_prompts), minlength=num_prompts).astype(float)
        drawn = rng.choice(seeds, size=len(seeds), replace=True)
        seed_weights = {s: float(np.sum(drawn == s)) for s in seeds}
        points = method_points(runs, prompt_weights=prompt_weights, seed_weights=seed_weights)
        base_b = float(prompt_weights @ baseline) / num_prompts if baseline is not None else None
        for i, method in enumerate(methods):
            for j, at in enumerate(values_at_budgets({method: points.get(method, [])}, budgets, base_b)[method]):
                if at.value is not None:
                    samples[b, i, j] = at.value
    return Bootstrap(methods=methods, budgets=list(budgets), estimate=estimate, samples=samples, seeds=seeds,
                     num_prompts=num_prompts)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of the finite entries of ``samples``; None when there are none."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Verdict:
    budget: float
    best: str | None  # the method with the highest value at this budget (None: no method has one)
    significant: bool  # best's value exceeds every other method's: each paired difference's CI excludes 0
    tied: list[str]  # the methods whose paired difference with best has a CI containing 0
    differences: dict[str, tuple[float, float]]  # other method -> CI of value(best) - value(other)
    text: str


def verdicts(boot: Bootstrap, level: float = 0.95) -> list[Verdict]:
    """At each budget: the best method by its estimate, and whether its lead over every other method is
    significant (the ``level`` CI of the paired difference lies above 0)."""
    out = []
    for j, budget in enumerate(boot.budgets):
        values = {m: boot.estimate[m][j].value for m in boot.methods if boot.estimate[m][j].value is not None}
        if not values:
            out.append(Verdict(budget, None, False, [], {}, "no method has a point within this budget"))
            continue
        best = max(values, key=values.get)
        i_best = boot.methods.index(best)
        differences, tied = {}, []
        for i, other in enumerate(boot.methods):
            if other == best or other not in values:
                continue
            ci = interval(boot.samples[:, i_best, j] - boot.samples[:, i, j], level)
            if ci is None:
                continue
            differences[other] = ci
            if ci[0] <= 0:
                tied.append(other)
        significant = not tied and bool(differences)
        if significant:
            text = f"{best} is best (its lead over every other method is significant at {level:.0%})"
        elif not differences:
            text = f"{best} is the only method with a value here"
        else:
            gaps = ", ".join(f"{m} [{differences[m][0]:+.3f}, {differences[m][1]:+.3f}]" for m in tied)
            text = f"not significant: {best} leads, but the {level:.0%} CI of its difference with {gaps} contains 0"
        out.append(Verdict(budget, best, significant, tied, differences, text))
    return out


@dataclass(frozen=True)
class Difference:
    """value(method) - value(against) at one budget: the estimate on the data as measured and its paired CI."""

    method: str
    budget: float
    value: float | None  # None: one of the two has no value within this budget
    low: float | None
    high: float | None

    @property
    def sign(self) -> int:
        """+1: significantly above ``against``, -1: significantly below, 0: the CI contains 0 (or no CI)."""
        if self.low is None or self.high is None:
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


def differences_from(boot: Bootstrap, against: str, level: float = 0.95) -> list[list[Difference]]:
    """Per budget, every other method's paired difference with the method ``against`` (a baseline such as DPO):
    the same resamples as the values, so what the two share cancels (as in :func:`verdicts`)."""
    if against not in boot.methods:
        raise ValueError(f"{against!r} is not one of the methods ({', '.join(boot.methods)})")
    i_ref = boot.methods.index(against)
    out = []
    for j, budget in enumerate(boot.budgets):
        ref = boot.estimate[against][j].value
        row = []
        for i, method in enumerate(boot.methods):
            if method == against:
                continue
            value = boot.estimate[method][j].value
            ci = interval(boot.samples[:, i, j] - boot.samples[:, i_ref, j], level)
            estimate = None if value is None or ref is None else value - ref
            row.append(Difference(method, budget, estimate, *(ci if ci and estimate is not None else (None, None))))
        out.append(row)
    return out
