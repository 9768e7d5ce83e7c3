"""Faults a hostile first user meets: a full disk, a read-only output, an output that is a file, two runs into
one folder, a hub id without a network, an unimportable reward module. One clear line each, nothing lost.

Full and read-only filesystems are real mounts (a 3 MB tmpfs, a read-only tmpfs) where this machine allows
mounting (root with CAP_SYS_ADMIN, as on CI); elsewhere a non-root user gets a real chmod'ed folder for the
read-only case, and otherwise the fault is injected into the write itself (SEPO_TEST_NO_MOUNT=1 runs these
fallbacks on a machine that can mount).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import sepo.models
from conftest import make_story_pairs_dataset
from sepo.cli import main
from sepo.errors import SepoError
from sepo.io import check_writable, lock_path, output_lock, save_dataset, storage_error

SRC = str(Path(sepo.models.__file__).resolve().parents[1])


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or os.environ.get("SEPO_TEST_NO_MOUNT"):  # the variable tries the fallbacks here
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a filesystem with no space left: a 3 MB tmpfs filled to the last block, or (where nothing can
    be mounted) a folder whose writes by datasets, safetensors and json fail with ENOSPC once they start."""
    disk = tmp_path / "disk"
    if _mount(disk, "size=3m"):
        with (disk / "ballast").open("wb") as f:  # fill it: every later data block fails
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield disk
        _umount(disk)
        return
    import datasets

    real_save = datasets.Dataset.save_to_disk

    def save_then_fail(self, path, *args, **kwargs):
        if str(path).startswith(str(disk)):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path) / "data-00000-of-00001.arrow"))
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_fail)
    yield disk


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be written into: a read-only tmpfs as root, a chmod 555 folder otherwise (root
    ignores chmod); as root where nothing can be mounted, file creation there fails with EROFS."""
    folder = tmp_path / "ro"
    if _mount(folder, "ro,size=1m"):
        yield folder
        _umount(folder)
        return
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def read_only_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_mkstemp)
    yield folder


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, stories260k):
    folder = tmp_path_factory.mktemp("pairs") / "pairs"
    tok = AutoTokenizer.from_pretrained(str(stories260k))
    save_dataset(make_story_pairs_dataset(tok, n=24), folder, {"stage": "data", "tokenizer": str(stories260k)})
    return folder


@pytest.fixture(scope="module")
def scores_dir(tmp_path_factory, pairs_dir, tiny_llama_stories):
    folder = tmp_path_factory.mktemp("scores") / "scores"
    assert main(["score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories), "--data",
                 str(pairs_dir), "--output", str(folder)]) == 0
    return folder


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a stage loads a model or a tokenizer (what a cheap early check must come before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the output was checked")

    for name in ("load_causal_lm", "load_tokenizer", "load_model_config"):
        monkeypatch.setattr(sepo.models, name, refuse)


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"sepo {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- disk full


def test_prepare_on_a_full_disk_says_so_and_leaves_nothing(full_disk, capsys, hh_path):
    out = full_disk / "pairs"
    rc = main(["data", "prepare", str(hh_path), "--tokenizer", "stories260k", "--on-invalid", "skip",
               "--output", str(out)])
    line = one_error_line(capsys.readouterr().err, "data prepare")
    assert rc == 2 and line.endswith(f"no space left on device while writing {out}; free space or choose another "
                                     "output")
    assert sorted(p.name for p in full_disk.iterdir() if p.name != "ballast") == []  # no folder, no temp, no lock


def test_score_on_a_full_disk_keeps_only_finished_shards(full_disk, capsys, pairs_dir, tiny_llama_stories):
    out = full_disk / "scores"
    rc = main(["score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories), "--data", str(pairs_dir),
               "--output", str(out), "--shard-size", "8"])
    line = one_error_line(capsys.readouterr().err, "score")
    assert rc == 2 and "no space left on device while writing" in line and str(full_disk) in line
    left = sorted(p.name for p in full_disk.iterdir() if p.name != "ballast")
    assert left in ([], ["scores.partial"])  # no output folder, no temp folder; the resume state at most
    for shard in (full_disk / "scores.partial").glob("shard-*"):
        assert (shard / "sepo_metadata.json").is_file()  # every shard kept is complete (resumable)
    assert not list((full_disk / "scores.partial").glob(".*tmp*")) if left else True


def test_select_on_a_full_disk_says_so_and_leaves_nothing(full_disk, capsys, scores_dir):
    out = full_disk / "selected"
    rc = main(["select", "--scores", str(scores_dir), "--output", str(out)])
    line = one_error_line(capsys.readouterr().err, "select")
    assert rc == 2 and line.endswith(f"no space left on device while writing {out}; free space or choose another "
                                     "output")
    assert [p.name for p in full_disk.iterdir() if p.name != "ballast"] == []


def test_what_train_writes_on_a_full_disk_is_recognised(tmp_path):
    """train writes safetensors (model), torch.save (optimizer state) and JSON lines; each library reports a full
    disk its own way, and storage_error reads them all (the CLI prints it for any stage, train included)."""
    import safetensors.torch
    import torch

    disk = tmp_path / "disk"
    if not _mount(disk, "size=1m"):
        errors = [OSError(errno.ENOSPC, "No space left on device"),
                  Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                            'left on device" })')]
    else:
        errors = []
        (disk / "policy").mkdir()
        big = {"w": torch.zeros(1024, 1024)}  # 4 MB on a 1 MB disk
        for write in (lambda p: safetensors.torch.save_file(big, str(p)), lambda p: torch.save(big, str(p)),
                      lambda p: Path(p).write_text("x" * 4_000_000)):
            with pytest.raises(Exception) as err:
                write(disk / "policy" / "model.bin")
            errors.append(err.value)
            (disk / "policy" / "model.bin").unlink(missing_ok=True)
    try:
        for e in errors:  # read while the disk is still full: torch.save's error has no errno, the free space tells
            fault = storage_error(e, disk / "policy")
            assert isinstance(fault, SepoError), e
            assert str(fault) == (f"no space left on device while writing {disk / 'policy'}; free space or choose "
                                  "another output"), (e, fault)
    finally:
        _umount(disk)
    assert storage_error(ValueError("a bug"), tmp_path) is None


# ---------------------------------------------------------------------------------------------- read-only, a file


@pytest.mark.parametrize("command", ["data prepare", "score", "select", "eval", "inspect", "pipeline", "demo"])
def test_a_read_only_output_is_refused_before_any_model_is_loaded(command, read_only, capsys, no_model_loads,
                                                                 pairs_dir):
    out = read_only / "sub" / "out"
    args = {"data prepare": [str(pairs_dir), "--tokenizer", "stories260k"],
            "score": ["--oracle", "stories260k", "--reference", "stories260k", "--data", str(pairs_dir)],
            "select": ["--scores", str(pairs_dir)], "eval": ["--model", "stories260k", "--data", str(pairs_dir)],
            "inspect": ["--scores", str(pairs_dir)], "pipeline": [f"data={pairs_dir}"], "demo": []}[command]
    rc = main([*command.split(), *args, "--output", str(out)])
    line = one_error_line(capsys.readouterr().err, command)
    assert rc == 2 and f"cannot write {out}: " in line and str(read_only) in line
    assert "is on a read-only filesystem" in line or "no permission to write in" in line
    assert line.endswith("choose another output folder")


def test_check_writable_is_what_train_calls(read_only, tmp_path):
    """train is wired by its own module; the helper it calls refuses the same way, and lets a good folder be."""
    with pytest.raises(SepoError, match="read-only filesystem|no permission"):
        check_writable(read_only / "policy")
    check_writable(tmp_path / "new" / "deeper" / "policy")
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.parametrize("command", ["pipeline", "demo", "data prepare", "select"])
def test_an_output_that_is_a_file_is_refused(command, tmp_path, capsys, no_model_loads, pairs_dir):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    args = {"pipeline": [f"data={pairs_dir}"], "demo": [], "data prepare": [str(pairs_dir), "--tokenizer", "x"],
            "select": ["--scores", str(pairs_dir)]}[command]
    rc = main([*command.split(), *args, "--output", str(out), "--overwrite"] if command in ("data prepare", "select")
              else [*command.split(), *args, "--output", str(out)])
    line = one_error_line(capsys.readouterr().err, command)
    assert rc == 2 and line.endswith(f"{out} already exists and is not a folder; choose another output folder")
    assert out.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- one run per output


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock of ``path``, as a running `sepo` stage would."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.argv = ["sepo", "score", "--output", {str(path)!r}]
        from sepo.io import output_lock
        with output_lock({str(path)!r}, stage="sepo.stages.score"):
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("command", ["data prepare", "score", "select", "eval", "inspect", "pipeline", "demo"])
def test_a_second_run_into_a_locked_output_is_refused_naming_the_first(command, tmp_path, capsys, no_model_loads,
                                                                      pairs_dir):
    out = tmp_path / "runs" / "out"
    holder = hold_lock(out)
    try:
        args = {"data prepare": [str(pairs_dir), "--tokenizer", "stories260k"],
                "score": ["--oracle", "stories260k", "--reference", "stories260k", "--data", str(pairs_dir)],
                "select": ["--scores", str(pairs_dir)], "eval": ["--model", "stories260k", "--data", str(pairs_dir)],
                "inspect": ["--scores", str(pairs_dir)], "pipeline": [f"data={pairs_dir}"], "demo": []}[command]
        rc = main([*command.split(), *args, "--output", str(out)])
        line = one_error_line(capsys.readouterr().err, command)
        assert rc == 2 and f"{out} is being written by another sepo run (pid {holder.pid} on " in line
        assert f"`sepo score --output {out}`" in line and "wait for it to finish, or choose another output" in line
        assert "overwrite" not in line  # the losing run must not suggest clobbering the one still writing
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over_and_released(tmp_path, pairs_dir, tiny_llama_stories, capsys):
    """SIGKILL leaves the lock file behind with a dead pid; the OS lock died with the process, so the next run
    takes it over at once, finishes, and removes it."""
    out = tmp_path / "scores"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    stale = json.loads(lock_path(out).read_text())
    assert stale["pid"] == holder.pid and stale["command"] == f"sepo score --output {out}"
    assert main(["score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories), "--data",
                 str(pairs_dir), "--output", str(out)]) == 0
    assert (out / "sepo_metadata.json").is_file() and not lock_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]


def test_two_real_score_runs_into_one_output(tmp_path, pairs_dir, tiny_llama_stories):
    """Two `sepo score` processes started together on one output: exactly one writes it; the other stops with
    the lock message (or, if the first had already finished, with "already exists")."""
    out = tmp_path / "scores"
    argv = [sys.executable, "-m", "sepo", "score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories),
            "--data", str(pairs_dir), "--output", str(out), "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in runs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    line = one_error_line(loser, "score")
    assert "is being written by another sepo run" in line or "already exists" in line
    if "being written" in line:
        assert "overwrite" not in line
    assert (out / "sepo_metadata.json").is_file() and not lock_path(out).exists()


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    """A stage that runs another stage into the same folder (a library caller nesting runs) is not refused."""
    with output_lock(tmp_path / "x"), output_lock(tmp_path / "x"):
        assert lock_path(tmp_path / "x").is_file()
    assert not lock_path(tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- hub without network


@pytest.fixture
def no_network(monkeypatch):
    """Online mode, and a hub client whose every request fails as a machine without DNS does. Counts calls."""
    import huggingface_hub
    from huggingface_hub import constants

    import sepo.hub

    calls = []

    def repo_info(self, repo_id, *args, **kwargs):
        calls.append(repo_id)
        time.sleep(0.05)
        raise OSError(-2, "Name or service not known")  # socket.gaierror is an OSError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(sepo.hub, "_probed", {})
    return calls


def test_a_hub_id_without_network_fails_in_seconds_with_a_hint(no_network, monkeypatch, capsys, pairs_dir):
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to fetch from the hub (a minute of retries)")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    started = time.monotonic()
    rc = main(["score", "--oracle", "oracel", "--reference", "stories260k", "--data", str(pairs_dir), "--output",
               str(pairs_dir.parent / "scores")])
    line = one_error_line(capsys.readouterr().err, "score")
    assert rc == 2 and time.monotonic() - started < 10
    assert "'oracel' is not a local path, and the Hugging Face hub (https://huggingface.co) cannot be reached" in line
    assert "Check the spelling or the path" in line and "HF_HUB_OFFLINE=1" in line
    assert no_network == ["oracel"]  # asked once


def test_a_dataset_id_without_network_fails_in_seconds(no_network, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets was asked to download"))
    assert main(["data", "inspect", "someorg/some-dataset"]) == 2
    line = one_error_line(capsys.readouterr().err, "data inspect")
    assert "data 'someorg/some-dataset' is not a local path" in line and "HF_HUB_OFFLINE=1" in line
    assert no_network == ["someorg/some-dataset"]


def test_cached_hub_models_load_from_the_cache_and_online_loading_is_untouched(no_network, monkeypatch):
    import huggingface_hub

    from sepo.hub import hub_kwargs

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kw: f"/cache/{repo_id}/{filename}" if repo_id == "org/cached"
                        else None)
    assert hub_kwargs("model", "org/cached") == {"local_files_only": True}
    with pytest.raises(SepoError, match="cannot be reached"):
        hub_kwargs("model", "org/not-cached")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: {"id": repo_id})
    assert hub_kwargs("model", "org/online") == {}  # the hub answers: from_pretrained runs exactly as before
    assert hub_kwargs("model", str(sepo.models.STORIES260K)) == {}  # a local folder never asks the hub


# ---------------------------------------------------------------------------------------------- reward modules


def test_a_reward_module_in_the_current_folder_gets_the_import_path_hint(tmp_path, monkeypatch):
    from sepo.evaluation import load_reward

    (tmp_path / "myreward.py").write_text("def score(prompts, completions):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(SepoError, match=r"cannot import score from module myreward .*current folder, which is not "
                                        r"on the import path: run with PYTHONPATH=\."):
        load_reward("myreward:score")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("myreward:score")(["p"], ["c"]) == [0.0]
