"""`sepo train` under faults and hostile input: an output path that is a file, an `--overwrite` run killed mid-way,
data in a read-only folder, a crafted checkpoint, and a reference cache built only for the rows a run draws."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sepo.errors import SepoError
from sepo.io import METADATA_FILE, save_dataset
from sepo.stages import train
from sepo.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_story_pairs_dataset  # noqa: E402


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from sepo.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("micro"), preset="micro", tokenizer="stories260k", seed=3)


@pytest.fixture(scope="module")
def pairs(micro, tmp_path_factory):
    from transformers import AutoTokenizer

    from sepo.models import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(micro))
    return save_dataset(make_story_pairs_dataset(tok, 12), tmp_path_factory.mktemp("pairs") / "pairs",
                        {"stage": "data", "num_rows": 12, "tokenizer_fingerprint": tokenizer_fingerprint(tok)})


def cfg(micro, data, out, **kw) -> TrainConfig:
    return TrainConfig(**{"model": str(micro), "data": str(data), "output": str(out), "loss": "simpo", "batch_size": 4,
                          "max_steps": 2, "learning_rate": 1e-3, **kw})


def test_an_output_that_is_a_file_is_one_clear_error(micro, pairs, tmp_path, capsys):
    from sepo.cli import main

    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    assert main(["train", "--model", str(micro), "--data", str(pairs), "--output", str(target), "--loss", "simpo",
                 "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not a folder; choose another output" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and target.read_text() == "not a folder"


def test_an_overwrite_killed_mid_run_keeps_the_previous_run_and_resumes_its_replacement(micro, pairs, tmp_path):
    out = tmp_path / "run"
    train.run(cfg(micro, pairs, out))
    old_weights, old_meta = load_file(str(out / "model.safetensors")), (out / METADATA_FILE).read_text()

    new = {"max_steps": 4, "save_steps": 1, "learning_rate": 2e-3, "logging_steps": 1}
    cmd = [sys.executable, "-m", "sepo", "train", "--model", str(micro), "--data", str(pairs), "--output", str(out),
           "--overwrite", "loss=simpo", "batch_size=4", *(f"{k}={v}" for k, v in new.items())]
    proc = subprocess.run(cmd, env={**os.environ, train.FAULT_ENV: "2", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the previous run is untouched; the replacement is being built beside it
    assert (out / METADATA_FILE).read_text() == old_meta
    assert all(torch.equal(v, load_file(str(out / "model.safetensors"))[k]) for k, v in old_weights.items())
    partial = tmp_path / "run.partial"
    assert (partial / "checkpoints" / "checkpoint-2").is_dir() and not (partial / METADATA_FILE).exists()

    result = train.run(cfg(micro, pairs, out, resume=True, overwrite=True, **new))  # what the pipeline reruns with
    assert result.steps == 4 and not partial.exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4]  # resumed at 2: the log continues
    assert json.loads((out / METADATA_FILE).read_text())["config"]["max_steps"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.old")]


def test_dpo_on_data_in_a_read_only_folder_caches_the_reference_in_the_output(micro, pairs, tmp_path, monkeypatch):
    """The data folders' parents are made read-only. root ignores file permissions, so for root the check sepo
    makes (os.access) is also told they are read-only, as it would be for any other user. A cache someone made
    beside read-only data before is still used."""
    import sepo.stages.reference_cache as rc

    fresh, cached = tmp_path / "fresh", tmp_path / "cached"
    shutil.copytree(pairs, fresh / "pairs")
    shutil.copytree(pairs, cached / "pairs")
    train.run(cfg(micro, cached / "pairs", tmp_path / "first", loss="dpo"))  # writable: the cache goes beside it
    assert list((cached / "pairs.ref-logps").glob("*/piece-*"))
    read_only = (fresh, cached, cached / "pairs.ref-logps")
    for folder in read_only:
        os.chmod(folder, 0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(rc.os, "access", lambda p, mode: False if any(Path(p).is_relative_to(f) for f in read_only)
                            else real_access(p, mode))
    computed, real_compute = [], rc.compute_reference_logps
    monkeypatch.setattr(rc, "compute_reference_logps", lambda ref, ds, *a, **k: computed.append(len(ds)) or
                        real_compute(ref, ds, *a, **k))
    try:
        out = tmp_path / "out"
        train.run(cfg(micro, fresh / "pairs", out, loss="dpo"))
        assert (out / METADATA_FILE).is_file() and [p.name for p in fresh.iterdir()] == ["pairs"]  # nothing beside
        assert list((out / "ref-logps").glob("*/piece-*")), "the reference log-probs are cached in the output folder"
        assert computed == [8]  # 2 steps of 4 pairs

        train.run(cfg(micro, cached / "pairs", tmp_path / "again", loss="dpo"))
        assert computed == [8] and not (tmp_path / "again" / "ref-logps").exists()  # read from beside the data
    finally:
        for folder in read_only:
            os.chmod(folder, 0o755)


def test_nothing_is_written_inside_the_data_folder(micro, pairs, tmp_path):
    """A subset and an eval split select rows; datasets would cache the selection as a file inside the folder the
    data was loaded from (another stage's output, maybe read-only). The reference cache goes beside it."""
    data = tmp_path / "pairs"
    shutil.copytree(pairs, data)
    before = sorted(p.name for p in data.iterdir())
    train.run(cfg(micro, data, tmp_path / "out", loss="dpo", subset=10, eval_size=3))
    assert sorted(p.name for p in data.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pairs", "pairs.ref-logps"]


def test_with_few_steps_only_the_drawn_rows_get_reference_log_probs_and_a_longer_run_adds_the_rest(
        micro, pairs, tmp_path, monkeypatch):
    import sepo.stages.reference_cache as rc
    from sepo.data.loader import GlobalBatchSampler
    from sepo.data.rows import pair_lengths
    from sepo.io import load_dataset_dir

    data = tmp_path / "pairs"
    shutil.copytree(pairs, data)
    computed = []
    real = rc.compute_reference_logps
    monkeypatch.setattr(rc, "compute_reference_logps", lambda ref, ds, *a, **k: computed.append(len(ds)) or
                        real(ref, ds, *a, **k))
    train.run(cfg(micro, data, tmp_path / "a", loss="dpo", batch_size=2, max_steps=1))
    drawn = GlobalBatchSampler(pair_lengths(load_dataset_dir(data)[0]), batch_size=2, num_steps=1).rows()
    assert computed == [2] and len(drawn) == 2
    train.run(cfg(micro, data, tmp_path / "b", loss="dpo", batch_size=2, max_steps=6))  # one epoch: every row
    assert computed == [2, 10]  # only the rows the first run did not draw
    train.run(cfg(micro, data, tmp_path / "c", loss="dpo", batch_size=2, max_steps=3))
    assert computed == [2, 10]  # all cached now


def _checkpointed_run(micro, pairs, out) -> Path:
    """A finished 3-step run with checkpoints at steps 1 and 2: --resume would continue from checkpoint-2."""
    train.run(cfg(micro, pairs, out, save_steps=1, max_steps=3))
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "train_state.json").is_file()
    return checkpoint


class RunsCode:
    """Unpickling this creates a folder: what a crafted checkpoint file would do instead of loading tensors."""

    marker = ""

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("crafted", ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_resume_refuses_a_crafted_checkpoint_without_running_it(crafted, micro, pairs, tmp_path):
    out = tmp_path / "run"
    checkpoint = _checkpointed_run(micro, pairs, out)
    marker = tmp_path / "code-ran"
    RunsCode.marker = str(marker)
    torch.save({"state": RunsCode()}, checkpoint / crafted)
    with pytest.raises(SepoError, match="refusing to resume") as caught:
        train.run(cfg(micro, pairs, out, save_steps=1, max_steps=3, resume=True))
    assert not marker.exists(), "the crafted checkpoint ran code"
    assert crafted in str(caught.value)


def test_resuming_with_another_global_batch_is_refused(micro, pairs, tmp_path):
    """A checkpoint records its global batch (batch_size x processes x accumulation); resuming it with another
    process count would continue on other pairs, so it is refused (here the record says 2 processes made it)."""
    out = tmp_path / "run"
    checkpoint = _checkpointed_run(micro, pairs, out)
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["global_batch"] == 4 and isinstance(state["scheduler"], dict)
    (checkpoint / "train_state.json").write_text(json.dumps({**state, "global_batch": 8}))
    with pytest.raises(SepoError, match="global batches of 8 pairs, this run has 4 .*resume with the process count"):
        train.run(cfg(micro, pairs, out, save_steps=1, max_steps=3, resume=True))
