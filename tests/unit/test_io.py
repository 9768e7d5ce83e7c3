"""Atomic stage outputs: a failed write leaves nothing under the final name."""

from __future__ import annotations

import datasets
import pytest

from sepo.errors import SepoError
from sepo.io import atomic_dir, fingerprint, load_dataset_dir, read_metadata, save_dataset


def test_atomic_dir_removes_everything_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(SepoError, match="already exists"), atomic_dir(out):
        pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_and_load_dataset_with_metadata(tmp_path):
    ds = datasets.Dataset.from_dict({"index": [0, 1], "chosen_input_ids": [[1, 2], [3]]})
    save_dataset(ds, tmp_path / "d", {"stage": "test"})
    loaded, meta = load_dataset_dir(tmp_path / "d", ["chosen_input_ids"])
    assert loaded["chosen_input_ids"] == [[1, 2], [3]] and meta == {"stage": "test"}
    with pytest.raises(SepoError, match="lacks column.*chosen_rewards.*sepo score"):
        load_dataset_dir(tmp_path / "d", ["chosen_rewards"], produced_by="sepo score")


def test_missing_or_foreign_folders_are_named(tmp_path):
    with pytest.raises(SepoError, match="does not exist"):
        load_dataset_dir(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SepoError, match="not written by a sepo stage"):
        read_metadata(tmp_path / "plain")


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
