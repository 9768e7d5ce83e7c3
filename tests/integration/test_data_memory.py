"""`sepo data prepare` streams: its peak memory does not grow with the input (10x the rows, < 1.2x the peak).

Memory is the process's anonymous resident memory (RssAnon: the Python heap, Arrow buffers, tokenizer
caches), sampled from /proc every 10 ms. File-backed pages of the memory-mapped Arrow files are left out: they
are page cache, which the kernel takes back under memory pressure (docs/data.md, "Memory").
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sepo

SRC = str(Path(sepo.__file__).resolve().parents[1])
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "was", "happy", "then", "dog", "came", "by", "they",
         "played", "all", "day", "long"]


def write_rows(path: Path, n: int) -> Path:
    """n pairs, each with a 3 KB metadata column: the old reader held every row as Python objects."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=30)),
                                "chosen": " " + " ".join(rng.choices(WORDS, k=20)),
                                "rejected": " " + " ".join(rng.choices(WORDS, k=20)),
                                "note": "".join(rng.choices("abcdefgh ", k=3000)), "id": i}) + "\n")
    return path


def peak_anonymous_mb(argv: list[str]) -> float:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.01)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    return peak / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from Linux's /proc")
def test_prepare_peak_memory_does_not_grow_with_the_input(tmp_path):
    peaks = {}
    for n in (800, 8000):
        source = write_rows(tmp_path / f"rows-{n}.jsonl", n)
        peaks[n] = peak_anonymous_mb([sys.executable, "-m", "sepo", "data", "prepare", str(source), "--tokenizer",
                                      "stories260k", "--output", str(tmp_path / f"out-{n}")])
        from sepo.io import load_dataset_dir

        assert len(load_dataset_dir(tmp_path / f"out-{n}")[0]) == n
    assert (tmp_path / "rows-8000.jsonl").stat().st_size > 9 * (tmp_path / "rows-800.jsonl").stat().st_size
    assert peaks[8000] < 1.2 * peaks[800], peaks
