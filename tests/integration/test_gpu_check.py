"""benchmarks/gpu_check.sh --cpu-smoke: every section of the GPU check runs (tiny shapes, on the CPU), so the script
is ready when a GPU machine is; the figures themselves mean nothing at these sizes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--json", str(out)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    cases = {(r["section"], r["case"], r["sharing"]): r for r in report["results"]}
    for loss in ("sepo", "dpo", "simpo"):
        for sharing in ("off", "on"):
            r = cases[("train", f"sepo train --loss {loss}", sharing)]
            assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_mib"] >= 0
    for key in (("score", "sepo score", "off"), ("score", "sepo score", "on"), ("score", "paper's procedure", "-")):
        assert cases[key]["tokens_per_s"] > 0
    trl_rows = [k for k in cases if k[1].startswith("TRL ")]
    if importlib.util.find_spec("trl") is not None:
        assert report["trl_skipped"] is None
        assert {k[1] for k in trl_rows} == {"TRL DPOTrainer", "TRL DPOTrainer precompute_ref_log_probs",
                                            "TRL CPOTrainer simpo"}
    else:  # trl is an optional peer, not installed here: the TRL rows are skipped, and the report says why
        assert not trl_rows and "not importable" in report["trl_skipped"]
        assert "TRL rows skipped" in done.stdout
    (head,) = report["head"]
    for label in ("selective vs full logits", "packed vs plain rows", "selective vs fp32 full logits"):
        assert math.isfinite(head[label]) and head[label] < 1e-4  # fp32 in the smoke: agreement to rounding
    summary = report["summary"]["kit-qwen2-tiny"]
    assert "score (sharing on) / paper's procedure tokens/s (target >= 20x)" in summary
