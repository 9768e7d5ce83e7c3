"""The report of `sepo sweep`: ``summary.json``, ``summary.md`` and ``frontier.png`` from the points' rows and
their per-prompt generations. The statistics are :mod:`sepo.core.frontier`'s; this module reads, tabulates
and plots. docs/study.md explains how to read them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sepo.core import frontier
from sepo.io import atomic_write_json, atomic_write_text

TABLE = (("reward", "reward"), ("win_rate", "win rate"), ("kl", "KL"), ("pref_accuracy", "pref acc"),
         ("distinct_2", "distinct-2"), ("repeated_ngrams", "repeated 3-grams"), ("unknown_words", "unknown words"),
         ("replacement_chars", "U+FFFD"), ("mean_output_tokens", "tokens"))


def write(cfg, plan, rows: list[dict], *, seconds: float) -> dict:
    """Compute the statistics, write the three files; -> summary (with its Markdown under ``markdown``)."""
    from sepo.stages.sweep import points_with_data

    data = points_with_data(rows, plan)
    summary: dict[str, Any] = {
        "output": str(plan.out), "budgets": list(cfg.budgets), "seeds": list(cfg.seeds),
        "num_points": len(rows), "failed": [{"id": r["id"], "error": r.get("error")} for r in rows
                                            if r.get("status") != "ok"],
        "strengths": strength_means(rows), "seconds": round(seconds, 1)}
    reference = next(((r, g) for r, g in data if r["method"] == "reference"), None)
    trained = [(r, g) for r, g in data if r["method"] != "reference"]
    if reference is None or reference[0].get("reward") is None:
        summary["frontier"] = None
        summary["note"] = ("no reward: the eval samples were not scored, so there is no frontier. Set reward (a "
                           "module:function or a reward model) or use a task")
    else:
        summary["reference"] = {"reward": reference[0]["reward"], "kl": 0.0,
                                "num_prompts": len(reference[1])}
        summary["frontier"] = matched_kl(cfg, reference, trained)
        frontier_plot(plan.out / "frontier.png", rows, summary)
        summary["plots"] = ["frontier.png"]
    summary["selection"] = selection_quality(plan)
    summary["concentration"] = concentration(plan, seed=cfg.seed, resamples=cfg.bootstrap)
    summary["markdown"] = markdown(summary, rows, contrasts=list(getattr(cfg, "contrasts", [])))
    atomic_write_json(plan.out / "summary.json", {k: v for k, v in summary.items() if k != "markdown"})
    atomic_write_text(plan.out / "summary.md", summary["markdown"])
    return summary


# --------------------------------------------------------------------------- statistics


def selection_quality(plan) -> dict:
    """variant -> {oracle, random} -> ``selection_report`` (computed by the variant's job; a task's sweeps only)."""
    from sepo.stages.sweep_jobs import QUALITY_FILE

    out = {}
    for name, variant in plan.variants.items():
        path = variant.folder / QUALITY_FILE
        if path.is_file():
            out[name] = json.loads(path.read_text(encoding="utf-8"))["reports"]
    return out


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None


def strength_means(rows: list[dict]) -> list[dict]:
    """One entry per (method, strength): the mean over its finished seeds of every metric of the table."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["method"], r["strength_label"]), []).append(r)
    out = []
    for (method, label), members in groups.items():
        entry = {"method": method, "strength": label, "seeds": [m["seed"] for m in members],
                 "token_fraction": members[0].get("token_fraction")}
        entry.update({key: _mean([m.get(key) for m in members]) for key, _ in TABLE})
        entry["sample"] = (members[0].get("samples") or [{}])[0].get("output")
        out.append(entry)
    return out


def matched_kl(cfg, reference: tuple[dict, list[dict]], trained: list[tuple[dict, list[dict]]]) -> dict:
    """Each method's value at each budget with its bootstrap CI, its front, and the verdicts."""
    ref_row, ref_gens = reference
    prompts = [g["prompt"] for g in ref_gens]
    runs = []
    for row, gens in trained:
        if [g["prompt"] for g in gens] != prompts:
            from sepo.errors import SepoError

            raise SepoError(f"point {row['id']} was evaluated on other prompts than the reference; delete its "
                            "result.json and rerun")
        runs.append(frontier.Run(row["method"], row["strength_label"], row["seed"],
                                 np.array([g["reward"] for g in gens], dtype=float),
                                 np.array([g["kl"] if g.get("kl") is not None else np.nan for g in gens], dtype=float)))
    for run in runs:
        np.nan_to_num(run.kl, copy=False, nan=0.0)  # an empty sample: no tokens, no KL term
    baseline = np.array([g["reward"] for g in ref_gens], dtype=float)
    if not runs:
        return {"methods": {}, "verdicts": [], "fronts": {}}
    boot = frontier.bootstrap(runs, cfg.budgets, baseline=baseline, n_resamples=cfg.bootstrap, seed=cfg.seed)
    means = frontier.method_points(runs)
    methods = {}
    for i, method in enumerate(boot.methods):
        front = frontier.pareto_front([(0.0, float(baseline.mean())), *means[method]])
        kls = [k for k, _ in means[method]]
        at = {}
        for j, budget in enumerate(boot.budgets):
            estimate = boot.estimate[method][j]
            ci = frontier.interval(boot.samples[:, i, j])
            at[f"{budget:g}"] = {"value": estimate.value, "low": ci[0] if ci else None, "high": ci[1] if ci else None,
                                 "reached": estimate.reached}
        methods[method] = {"at_budget": at, "front": front, "kl_range": [min(kls), max(kls)],
                           "strength_points": means[method]}
    verdicts = [{"budget": v.budget, "best": v.best, "significant": v.significant, "tied": v.tied,
                 "differences": {k: list(ci) for k, ci in v.differences.items()}, "text": v.text}
                for v in frontier.verdicts(boot)]
    pairs = [(a, b) for i, a in enumerate(boot.methods) for b in boot.methods[i + 1:]]
    differences = {}
    for d in frontier.differences(boot, pairs):
        differences.setdefault(f"{d.a} - {d.b}", {})[f"{d.budget:g}"] = {
            "value": d.value, "low": d.low, "high": d.high, "reached": d.reached}
    return {"methods": methods, "verdicts": verdicts, "differences": differences, "num_prompts": boot.num_prompts,
            "seeds": boot.seeds, "resamples": cfg.bootstrap}


def contrast(fr: dict, text: str) -> dict | None:
    """budget -> the difference 'A - B' (a pair stored the other way round is negated); None if a method has
    no finished point."""
    from sepo.stages.sweep import parse_contrast

    a, b = parse_contrast(text)
    if f"{a} - {b}" in fr["differences"]:
        return fr["differences"][f"{a} - {b}"]
    if f"{b} - {a}" not in fr["differences"]:
        return None
    flip = lambda x: None if x is None else -x  # noqa: E731
    return {budget: {"value": flip(d["value"]), "low": flip(d["high"]), "high": flip(d["low"]),
                     "reached": d["reached"]} for budget, d in fr["differences"][f"{b} - {a}"].items()}


def concentration(plan, *, seed: int = 0, level: float = 0.95, resamples: int = 1000) -> dict:
    """Each variant's reward concentration (``sepo inspect``'s: the share of a response's tokens carrying 80% of
    its sum |r_t|, on the training pairs it selected on): the per-response mean with a bootstrap CI over
    responses. Variants that differ only in their ``seed`` (oracles trained on other subsets, in another order)
    are also pooled: the mean over the oracles, its CI resampling oracles, then responses. ``seed`` is the
    sweep's (a variant's default) and the bootstrap's. -> {"variants": {name: ...}, "pooled": [...]}"""
    from sepo.stages.sweep_jobs import QUALITY_FILE

    per_variant, groups = {}, {}
    for name, variant in plan.variants.items():
        path = variant.folder / QUALITY_FILE
        conc = json.loads(path.read_text(encoding="utf-8")).get("concentration") if path.is_file() else None
        if not conc:
            continue
        every = np.array([np.nan if x is None else x for side in conc["shares"].values() for x in side], dtype=float)
        if not np.isfinite(every).any():
            continue
        estimate, low, high = frontier.nested_bootstrap_mean([every], n_resamples=resamples, seed=seed, level=level)
        per_variant[name] = {
            "level": conc["level"], "responses": conc["responses"]["responses"], "mean": estimate, "low": low,
            "high": high, "median": conc["responses"]["tokens_for_level_median"],
            "on_mean_curve": conc["responses"]["tokens_for_level_on_mean_curve"],
            "gaussian": conc.get("gaussian_tokens_for_level_mean"),
            **{side: conc[side]["tokens_for_level_mean"] for side in conc["shares"]}}
        made = {k: v for k, v in variant.settings.items() if k not in ("configured", "axes", "seed")}
        groups.setdefault(json.dumps(made, sort_keys=True), []).append(
            (name, variant.settings.get("seed", seed), every))
    pooled = []
    for members in groups.values():
        if len({m[1] for m in members}) > 1:
            estimate, low, high = frontier.nested_bootstrap_mean([m[2] for m in members], n_resamples=resamples,
                                                                 seed=seed, level=level)
            pooled.append({"variants": [m[0] for m in members], "seeds": [m[1] for m in members],
                           "mean": estimate, "low": low, "high": high})
    return {"variants": per_variant, "pooled": pooled} if per_variant else {}


# --------------------------------------------------------------------------- Markdown


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(summary: dict, rows: list[dict], contrasts: list[str] | None = None) -> str:
    lines = [f"# sepo sweep: {summary['output']}", ""]
    fr = summary.get("frontier")
    if fr is None:
        lines += [f"**{summary['note']}.**", ""]
    else:
        ref = summary["reference"]
        budgets = summary["budgets"]
        lines += [
            "## Matched KL", "",
            f"Best reward within each KL budget along each method's Pareto front (per-strength means over seeds "
            f"{', '.join(map(str, fr.get('seeds', [])))}; the reference at KL 0 starts every front; linear between "
            f"front points, never extrapolated). 95% CIs: {fr.get('resamples')} paired bootstrap resamples of seeds "
            f"and of the {fr.get('num_prompts')} held-out prompts. Reference (untrained policy): reward "
            f"{ref['reward']:.3f} at KL 0.", "",
            "| method | " + " | ".join(f"KL ≤ {b:g}" for b in budgets) + " | KL of its points |",
            "|---" * (len(budgets) + 2) + "|"]
        ended = False
        for method, m in fr["methods"].items():
            cells = []
            for b in budgets:
                at = m["at_budget"][f"{b:g}"]
                mark = "" if at["reached"] else " †"
                ended |= not at["reached"]
                cells.append(f"{_f(at['value'])} [{_f(at['low'])}, {_f(at['high'])}]{mark}")
            lo, hi = m["kl_range"]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {lo:.2f} – {hi:.2f} |")
        if ended:
            lines += ["", "† the method's front ends below this budget: the value is its strongest point's reward, "
                      "not extrapolated; a stronger setting might do better."]
        lines += ["", "| budget | verdict |", "|---|---|"]
        lines += [f"| KL ≤ {v['budget']:g} | {v['text']} |" for v in fr["verdicts"]]
        lines.append("")
        lines += _contrast_table(fr, budgets, contrasts or [])
    lines += ["## Points (means over seeds)", "",
              "| method | strength | seeds | tokens trained | " + " | ".join(t for _, t in TABLE) + " |",
              "|---" * (len(TABLE) + 4) + "|"]
    for s in summary["strengths"]:
        lines.append(f"| {s['method']} | {s['strength'] or '–'} | {len(s['seeds'])} | {_f(s['token_fraction'], 2)} | "
                     + " | ".join(_f(s[k], 2 if k in ("kl", "mean_output_tokens") else 3) for k, _ in TABLE) + " |")
    lines += ["", "reward: mean reward of one sample per held-out prompt; win rate: against the untrained policy's "
              "sample for the same prompt (ties ½); KL: KL(π‖π_ref) in nats per sample, on the policy's own samples; "
              "pref acc: held-out pairs; distinct-2: distinct word bigrams / all; repeated 3-grams: share of a "
              "sample's word trigrams that repeat; unknown words: share of words never seen in the training texts; "
              "U+FFFD: share of replacement characters; tokens: mean sample length.", ""]
    lines += _selection_tables(summary)
    lines += _concentration_table(summary)
    if summary["failed"]:
        lines += ["## Failed points", ""] + [f"- {f['id']}: {f['error']}" for f in summary["failed"]] + [""]
    lines += _samples(summary, rows)
    lines.append(f"{summary['num_points']} points; finished in {summary['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def _contrast_table(fr: dict, budgets: list[float], contrasts: list[str]) -> list[str]:
    """The configured contrasts: each paired difference at each budget, with its 95% CI."""
    from sepo.stages.sweep import expand_contrasts

    rows = [(text, contrast(fr, text)) for text in expand_contrasts(contrasts, list(fr["methods"]))]
    rows = [(text, d) for text, d in rows if d is not None]
    if not rows:
        return []
    lines = ["Paired differences (the same bootstrap resamples; a CI above 0: the first method is ahead):", "",
             "| difference | " + " | ".join(f"KL ≤ {b:g}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for text, d in rows:
        cells = []
        for b in budgets:
            at = d[f"{b:g}"]
            cells.append("–" if at["value"] is None else
                         f"{at['value']:+.3f} [{at['low']:+.3f}, {at['high']:+.3f}]{'' if at['reached'] else ' †'}")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return [*lines, "", "† a front ends below the budget: a strongest point's reward stands in for its value.", ""]


def _concentration_table(summary: dict) -> list[str]:
    """Each variant's reward concentration (and the pooled value of a swept variant)."""
    conc = summary.get("concentration")
    if not conc:
        return []
    level = next(iter(conc["variants"].values()))["level"]
    lines = ["## Reward concentration (the oracles' token rewards)", "",
             f"Share of a response's tokens (largest |r_t| first) that carries {level:.0%} of its sum |r_t| "
             "(`sepo inspect`'s measure; the paper's Fig. 1 says about 35–40%), on the training pairs each oracle "
             "scored: the per-response mean with a 95% bootstrap CI over responses; oracles that differ only in "
             "their seed, pooled: the mean over them, the CI resampling oracles, then responses. Gaussian r_t: the "
             "same measure for i.i.d. N(0, 1) rewards at the same lengths (no structure at all).",
             "", "| variant | responses | mean [95% CI] | median | on the mean curve | chosen | rejected | "
             "Gaussian r_t |", "|---|---|---|---|---|---|---|---|"]
    for name, v in conc["variants"].items():
        lines.append(f"| {name} | {v['responses']} | {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}] | "
                     f"{_f(v['median'])} | {_f(v['on_mean_curve'], 2)} | {_f(v.get('chosen'))} | "
                     f"{_f(v.get('rejected'))} | {_f(v.get('gaussian'))} |")
    for v in conc["pooled"]:
        lines.append(f"| {' + '.join(v['variants'])} (oracle seeds {', '.join(map(str, v['seeds']))}) | – | "
                     f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}] | – | – | – | – | – |")
    return [*lines, ""]


def _selection_tables(summary: dict) -> list[str]:
    """Each variant's selections against the task's key tokens (sepo.tasks.quality.markdown_table)."""
    from sepo.tasks.quality import markdown_table

    if not summary.get("selection"):
        return []
    lines = ["## Selection quality (known key tokens)", ""]
    names = {"oracle": "the oracle's selection",
             "random": "the random control (as many tokens per response; its precision and recall are the random "
                       "selection's, the AUROC column still ranks by the oracle's r)"}
    for variant, reports in summary["selection"].items():
        for selection, report in reports.items():
            lines += [markdown_table(report, title=f"variant {variant}: {names[selection]}")]
    return lines


def _samples(summary: dict, rows: list[dict]) -> list[str]:
    """The first held-out prompt's sample of the reference and of each method's most-drifted strength."""
    firsts: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("samples"):
            continue
        best = firsts.get(r["method"])
        if best is None or (r.get("kl") or 0) > (best.get("kl") or 0):
            firsts[r["method"]] = r
    if not firsts:
        return []
    prompt = next(iter(firsts.values()))["samples"][0]["prompt"]
    lines = ["## Samples", "", f"First held-out prompt: “{prompt}” — the reference's sample, and each method's at "
             "its run (strength and seed) with the highest KL:", ""]
    for method, r in firsts.items():
        text = r["samples"][0]["output"].replace("\n", " ").replace("|", "\\|")
        where = "" if method == "reference" else f" ({r['strength_label']}, seed {r['seed']}, KL {_f(r.get('kl'), 1)})"
        lines.append(f"- **{method}**{where}: {text}")
    return [*lines, ""]


# --------------------------------------------------------------------------- frontier.png


def _linear_in_kl(front: list) -> tuple[np.ndarray, np.ndarray]:
    """The front as the value_at_budget interpolation draws it: linear in KL, so curved on the log axis."""
    kls, rewards = [front[0][0]], [front[0][1]]
    for (k0, r0), (k1, r1) in zip(front, front[1:]):
        grid = np.linspace(k0, k1, 40)[1:]
        kls += grid.tolist()
        rewards += (r0 + (r1 - r0) * (grid - k0) / (k1 - k0)).tolist()
    return np.array(kls), np.array(rewards)


def frontier_plot(path: Path, rows: list[dict], summary: dict) -> None:
    """Reward against KL (symlog x: linear below 0.1 nats, so the reference's KL 0 shows): each seed's point,
    each strength's mean over seeds, and each method's Pareto front, drawn as the linear-in-KL interpolation
    the budgets read; the budgets as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = summary["frontier"]
    many = len(fr["methods"]) > 8  # the legend moves beside the axes
    fig, ax = plt.subplots(figsize=(10, 5.5) if many else (7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, m) in enumerate(fr["methods"].items()):
        # past the colour cycle, another line style and marker tell methods of the same colour apart
        color, cycle = colors[i % len(colors)], i // len(colors) % 4
        marker, style = "os^D"[cycle], ("-", "--", "-.", ":")[cycle]
        seeds = [(max(r["kl"], 0.0), r["reward"]) for r in rows
                 if r["method"] == method and r.get("status") == "ok" and r.get("kl") is not None]
        if seeds:
            ax.scatter(*zip(*seeds), s=12, alpha=0.35, color=color, marker=marker)
        ax.scatter(*zip(*[(max(k, 0.0), r) for k, r in m["strength_points"]]), s=36, color=color, edgecolors="black",
                   linewidths=0.5, marker=marker)
        ax.plot(*_linear_in_kl(m["front"]), color=color, lw=1.6, ls=style, marker=None, label=method)
    ax.scatter([0.0], [summary["reference"]["reward"]], marker="*", s=160, color="black", zorder=5,
               label="reference (KL 0)")
    for b in summary["budgets"]:
        ax.axvline(b, color="grey", ls=":", lw=1)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(left=0)
    ax.set(xlabel="KL(π‖π_ref) on the policy's samples (nats; symlog)", ylabel="reward (mean over held-out prompts)",
           title="reward–KL frontier: seeds (small), strength means (ringed), Pareto fronts (lines)")
    ax.title.set_fontsize(9)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
