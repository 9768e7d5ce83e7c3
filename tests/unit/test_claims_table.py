"""The verdict rule of scripts/claims_table.py (docs/claims.md) on hand-made differences."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("claims_table", ROOT / "scripts" / "claims_table.py")
claims_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims_table)


def d(value, low, high, reached=True):
    return {"value": value, "low": low, "high": high, "reached": reached}


def test_supported_when_a_beats_every_other_method_at_a_budget_and_loses_at_none():
    """Budget 1: A - dpo [0.1, 0.3] and A - simpo [0.05, 0.2]: both above 0, a win. Budget 3: A - simpo contains 0:
    undecided. Budget 10: A - dpo below 0 but a front ends below it (†): it decides nothing."""
    diffs = {"dpo": {"1": d(0.2, 0.1, 0.3), "3": d(0.1, 0.02, 0.2), "10": d(-0.3, -0.5, -0.1, reached=False)},
             "simpo": {"1": d(0.1, 0.05, 0.2), "3": d(0.0, -0.1, 0.1), "10": d(0.1, 0.0, 0.2)}}
    assert claims_table.verdict(diffs, ["1", "3", "10"]) == ("supported", ["1"], [])


def test_refuted_when_another_method_is_significantly_ahead_and_not_resolved_when_budgets_disagree():
    lost = {"dpo": {"1": d(-0.2, -0.3, -0.1), "3": d(0.0, -0.1, 0.1)}, "simpo": {"1": d(0.2, 0.1, 0.3), "3": d(0.1, 0.0, 0.2)}}
    assert claims_table.verdict(lost, ["1", "3"]) == ("refuted", [], ["1"])
    mixed = {"dpo": {"1": d(-0.2, -0.3, -0.1), "3": d(0.2, 0.1, 0.3)}}
    assert claims_table.verdict(mixed, ["1", "3"]) == ("not resolved", ["3"], ["1"])
    assert claims_table.verdict({"dpo": {"1": d(0.0, -0.1, 0.1)}}, ["1"]) == ("not resolved", [], [])
