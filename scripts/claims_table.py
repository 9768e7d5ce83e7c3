"""The numbers of docs/claims.md, read from the claim sweeps' summaries (configs/claims/*.yaml), with the verdict
rule applied the same way to every claim.

    python scripts/claims_table.py [RUNS]        # RUNS: the sweeps' parent folder (default runs/claims)

For each task found under RUNS (sentiment, minimal_pairs, noisy_chosen) it prints, as Markdown:

* (a) the pooled reward concentration of the three oracle seeds (mean share of tokens for 80% of sum |r_t|,
  95% CI), beside the same measure for structureless Gaussian token rewards;
* (b)-(e) the paired differences each claim reads, at every KL budget, with their 95% CIs, and a verdict.

Verdict of "A beats B1, ..., Bn" (`verdict`): at a budget where every front reaches it (no † value), A *wins*
when the CI of A - Bi lies above 0 for every i, and *loses* when the CI of A - Bi lies below 0 for some i.
Supported: A wins at some budget and loses at none; refuted: loses at some budget and wins at none; not
resolved otherwise (no budget decides, or the budgets disagree -- the detail says which).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sepo.stages.sweep_report import contrast

TASKS = ("sentiment", "minimal_pairs", "noisy_chosen")
# claim -> (the method that should win, the methods it should beat); (d) is (b) on noisy_chosen
CLAIMS = {
    "b": ("sepo", ("dpo", "simpo")),
    "b-random": ("sepo", ("sepo_random",)),
    "c": ("sepo_weak", ("dpo", "simpo")),
    "e": ("sepo", ("sepo_k10", "sepo_k50", "sepo_k100")),
}


def verdict(diffs: dict[str, dict], budgets: list[str]) -> tuple[str, list[str], list[str]]:
    """diffs: other method -> budget -> {value, low, high, reached} of A - other.
    -> (supported | refuted | not resolved, budgets won, budgets lost)."""
    won, lost = [], []
    for b in budgets:
        cells = [d.get(b) for d in diffs.values()]
        if any(c is None or c["value"] is None or not c["reached"] for c in cells):
            continue  # a † value (a front ending below the budget) or a missing one decides nothing
        if all(c["low"] > 0 for c in cells):
            won.append(b)
        if any(c["high"] < 0 for c in cells):
            lost.append(b)
    if won and not lost:
        return "supported", won, lost
    if lost and not won:
        return "refuted", won, lost
    return "not resolved", won, lost


def _cell(d: dict | None) -> str:
    if d is None or d["value"] is None:
        return "–"
    return f"{d['value']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{'' if d['reached'] else ' †'}"


def task_rows(task: str, summary: dict) -> list[str]:
    fr = summary["frontier"]
    budgets = [f"{b:g}" for b in summary["budgets"]]
    lines = [f"### {task}", ""]
    conc = summary.get("concentration") or {}
    for pooled in conc.get("pooled", []):
        gaussian = [g for g in (conc["variants"][v].get("gaussian") for v in pooled["variants"]) if g is not None]
        reference = f" (Gaussian r_t: {sum(gaussian) / len(gaussian):.3f})" if gaussian else ""
        lines.append(f"(a) concentration, oracles {', '.join(pooled['variants'])}: {pooled['mean']:.3f} "
                     f"[{pooled['low']:.3f}, {pooled['high']:.3f}] of the tokens carry 80% of sum |r_t|{reference}")
    for name, v in conc.get("variants", {}).items():
        lines.append(f"    {name}: {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]")
    lines += ["", "| claim | difference | " + " | ".join(f"KL ≤ {b}" for b in budgets) + " | verdict |",
              "|---" * (len(budgets) + 3) + "|"]
    for claim, (a, others) in CLAIMS.items():
        diffs = {o: contrast(fr, f"{a} - {o}") for o in others if a in fr["methods"] and o in fr["methods"]}
        diffs = {o: d for o, d in diffs.items() if d is not None}
        if not diffs:
            continue
        outcome, won, lost = verdict(diffs, budgets)
        detail = outcome + (f" (wins at {', '.join(won)})" if won else "") + (f" (loses at {', '.join(lost)})" if lost else "")
        for i, (o, d) in enumerate(diffs.items()):
            lines.append(f"| {claim if i == 0 else ''} | {a} − {o} | "
                         + " | ".join(_cell(d.get(b)) for b in budgets) + f" | {detail if i == 0 else ''} |")
    points = {m: v["kl_range"] for m, v in fr["methods"].items()}
    lines += ["", "KL ranges of the points: " + "; ".join(f"{m} {lo:.2f}–{hi:.2f}" for m, (lo, hi) in points.items()),
              f"reference reward {summary['reference']['reward']:.3f}; {summary['num_points']} points, "
              f"{summary['seconds']:.0f} s", ""]
    return lines


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "runs/claims")
    found = False
    for task in TASKS:
        path = root / task / "summary.json"
        if path.is_file():
            found = True
            print("\n".join(task_rows(task, json.loads(path.read_text(encoding="utf-8")))))
    if not found:
        print(f"no claim sweep summaries under {root} (run: sepo sweep configs/claims/TASK.yaml)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
