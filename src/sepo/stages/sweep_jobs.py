"""The work of `sepo sweep` after the data exists, in worker processes: each shared variant (a `sepo pipeline`
run: oracle, scores, selections) and each point (train, then eval), scheduled as soon as what it reads is
done, ``jobs`` at a time, under one progress bar.

Workers are spawned (a fresh interpreter: no forked torch state), use ``threads`` torch threads each, send
everything they print to the job's ``log.txt``, and die with the sweep (Linux: PR_SET_PDEATHSIG), so a
killed sweep leaves no process writing into a point that the resumed sweep runs again. A point is done when
its ``result.json`` exists with the point's key; it is written last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sepo.config import to_dict
from sepo.errors import SepoError
from sepo.io import atomic_write_json

log = logging.getLogger(__name__)
SAMPLE_TEXTS = 3  # sample texts kept in each point's row
FAULT_ENV = "SEPO_FAULT_KILL_SWEEP_AFTER_POINTS"  # fault injection for the resume test: SIGKILL after N points
METRICS = ("reward", "win_rate", "kl", "pref_accuracy", "pref_metric", "distinct_2", "repeated_ngrams",
           "unknown_words", "replacement_chars", "mean_output_tokens")


@dataclass
class Job:
    id: str
    fn: Callable[[Any], dict]  # run_variant or run_point: module-level, so a spawned worker can unpickle it
    arg: Any
    after: list[str] = field(default_factory=list)  # jobs that must have finished first
    is_point: bool = True


def point_done(point) -> bool:
    if not point.result_path.is_file():
        return False
    try:
        return json.loads(point.result_path.read_text(encoding="utf-8")).get("key") == point.key
    except (json.JSONDecodeError, OSError):
        return False


def _cache_group(point) -> tuple | None:
    """Points whose training reads the same cached reference log-probs (computed by the first of them)."""
    from sepo.core.objectives import needs_reference, needs_reference_model

    t = point.train
    if t is None or not needs_reference(t.loss) or needs_reference_model(t.loss):
        return None
    return (t.data, t.reference or t.model, t.dtype)


def jobs_of(plan) -> tuple[list[Job], int]:
    """The variants and the points not done yet, each after what it reads; -> (jobs, points already done).
    Variants run first (every point of theirs waits for them); a point that shares a reference cache with an
    earlier point waits for it, so one process computes the cache."""
    todo = [p for p in plan.points if not point_done(p)]
    unjudged = [v for v in plan.variants.values() if v.task is not None and not quality_is_current(v)]
    if not todo and not unjudged:
        return [], len(plan.points)
    jobs = [Job(f"variant {v.name}", run_variant, v, is_point=False) for v in plan.variants.values()]
    leaders: dict[tuple, str] = {}
    for p in todo:
        after = [f"variant {p.variant}"] if p.variant else []
        group = _cache_group(p)
        if group is not None:
            if group in leaders:
                after.append(leaders[group])
            else:
                leaders[group] = p.id
        jobs.append(Job(p.id, run_point, p, after))
    return jobs, len(plan.points) - len(todo)


def run_jobs(plan, jobs: int, threads: int) -> None:
    """Run every job of ``plan`` whose inputs are ready, ``jobs`` at a time, until all are done."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    pending, done_before = jobs_of(plan)
    total = len(plan.points)
    log.info("== points: %d in all, %d done, %d to run (after %d shared variant(s)) in %d worker(s) x %d torch "
             "thread(s)", total, done_before, sum(j.is_point for j in pending), len(plan.variants),
             min(jobs, len(pending)), threads)
    if not pending:
        return
    finished: set[str] = set()
    kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    bar = tqdm(total=total, initial=done_before, unit="point", desc="sweep", dynamic_ncols=True)
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads, os.getpid())) as pool:
            running: dict[Any, Job] = {}
            while pending or running:
                for job in [j for j in pending if all(a in finished for a in j.after)]:
                    if len(running) >= jobs:
                        break
                    pending.remove(job)
                    running[pool.submit(job.fn, job.arg)] = job
                if not running:
                    raise SepoError(f"jobs {', '.join(j.id for j in pending)} wait for jobs that did not finish")
                completed, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in completed:
                    job = running.pop(future)
                    log_file = _log_path(job)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        raise SepoError(f"a worker process died while running {job.id} (killed, or out of memory?); "
                                        f"its log: {log_file}. Rerun the same command to resume: finished points are "
                                        "kept") from None
                    if not job.is_point and outcome.get("status") != "ok":
                        raise SepoError(f"shared {job.id} failed: {outcome.get('error')} (log: {log_file})")
                    finished.add(job.id)
                    if not job.is_point:
                        bar.set_postfix_str(f"{job.id} ready", refresh=True)
                        continue
                    if outcome.get("status") != "ok":
                        tqdm.write(f"point {job.id} failed: {outcome.get('error')} (log: {log_file})")
                    bar.set_postfix_str(job.id, refresh=False)
                    bar.update(1)
                    if kill_after and bar.n - done_before >= kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)  # an honest crash, for the resume test
    finally:
        bar.close()


def _log_path(job: Job) -> Path:
    return job.arg.folder / "log.txt"


# --------------------------------------------------------------------------- in the worker


def _init_worker(threads: int, parent: int) -> None:
    """A worker: dies with the sweep, uses ``threads`` torch threads, logs at INFO (into each job's log.txt)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(1)
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


@contextlib.contextmanager
def _output_to(path: Path):
    """Everything this process writes to stdout and stderr (logs, warnings, progress bars) goes to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_variant(variant) -> dict:
    """A shared variant's pipeline (its markers skip what is done); a SepoError is reported, not raised."""
    from sepo.stages import pipeline

    with _output_to(variant.folder / "log.txt"):
        log.info("== variant %s (%s)", variant.name, time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            pipeline.run(variant.pipeline)
            if variant.task is not None:
                selection_quality(variant)
        except SepoError as e:
            log.error("variant %s failed: %s", variant.name, e)
            return {"status": "failed", "error": str(e)}
    return {"status": "ok"}


QUALITY_FILE = "selection_quality.json"


def stored_quality(variant) -> dict | None:
    """The variant's QUALITY_FILE when it holds what this version writes (one made by an older sepo lacks the
    reward concentration: a resumed sweep recomputes it from the stored selections); else None."""
    path = variant.folder / QUALITY_FILE
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return stored if stored is not None and "concentration" in stored else None


def quality_is_current(variant) -> bool:
    return stored_quality(variant) is not None


def selection_quality(variant) -> dict:
    """The variant's selections (oracle and random control) against the task's known key tokens and tokens to
    avoid (``sepo.tasks.quality.selection_report``), and the concentration of its oracle's token rewards
    (``sepo inspect``'s measure, with every response's share for the CIs), in
    ``<variant>/selection_quality.json``; kept while the selections it was computed on are (their markers'
    fingerprints)."""
    from sepo.io import load_dataset_dir
    from sepo.models import load_tokenizer
    from sepo.stages.inspect import concentration_summary
    from sepo.tasks import get_task
    from sepo.tasks.quality import selection_report

    made_from = {name: json.loads((variant.folder / f"{name}.done.json").read_text())["fingerprint"]
                 for name in ("selected", "selected-random") if (variant.folder / f"{name}.done.json").is_file()}
    stored = stored_quality(variant)
    if stored is not None and stored.get("made_from") == made_from:
        return stored
    task = get_task(variant.task)
    tokenizer = load_tokenizer(variant.tokenizer)
    reports = {}
    for selection, name in (("oracle", "selected"), ("random", "selected-random")):
        if name in made_from:
            ds = load_dataset_dir(variant.folder / name, ("chosen_mask", "rejected_mask"))[0]
            reports[selection] = selection_report(ds, tokenizer, task.key_tokens, task.avoid_tokens)
    concentration = concentration_summary(load_dataset_dir(variant.folder / "selected", ("chosen_rewards",))[0])
    out = {"variant": variant.name, "task": variant.task, "made_from": made_from, "reports": reports,
           "concentration": concentration}
    atomic_write_json(variant.folder / QUALITY_FILE, out)
    return out


def run_point(point) -> dict:
    """Train (resuming or replacing a half-done policy), evaluate, and write result.json last."""
    from sepo.stages import evaluate, train
    from sepo.stages.pipeline import _resumable

    folder = point.folder
    folder.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {
        "id": point.id, "method": point.method, "loss": point.loss, "selection": point.selection,
        "variant": point.variant, "strength": point.strength, "strength_label": point.strength_label,
        "seed": point.seed, "key": point.key}
    with _output_to(folder / "log.txt"):
        log.info("== point %s (%s)", point.id, time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            row["token_fraction"] = _token_fraction(point)
            if point.train is not None:
                started = time.time()
                trained = train.run(_resumable(point.train, Path(point.train.output)))
                row.update(train_steps=trained.steps, train_loss=trained.metrics.get("final_loss"),
                           train_seconds=round(time.time() - started, 2))
            metrics = evaluate.run(point.eval)
        except SepoError as e:
            log.error("point %s failed: %s", point.id, e)
            row.update(status="failed", error=str(e))
        else:
            row.update(status="ok", **point_metrics(metrics, Path(point.eval.output)))
        if point.train is not None and not point.keep_policy:
            shutil.rmtree(point.train.output, ignore_errors=True)
    row["config"] = {"train": to_dict(point.train) if point.train is not None else None, "eval": to_dict(point.eval)}
    atomic_write_json(point.result_path, row)
    return row


def _token_fraction(point) -> float:
    """Share of the training pairs' response tokens the point trains on (0 for the untrained reference)."""
    from sepo.io import load_dataset_dir
    from sepo.stages.pipeline import token_fraction
    from sepo.stages.train import trains_on_selection

    if point.train is None:
        return 0.0
    if not trains_on_selection(point.train):
        return 1.0
    return token_fraction(load_dataset_dir(point.train.data, ("chosen_mask", "rejected_mask"))[0])


def point_metrics(metrics: dict, eval_dir: Path) -> dict:
    """The row's metrics (eval's metrics.json) and its first sample texts."""
    from sepo.stages.sweep import read_generations

    out = {k: metrics.get(k) for k in METRICS}
    out["eval_seconds"] = metrics.get("seconds")
    out["samples"] = [{"prompt": g["prompt"], "output": g["output"], "reward": g.get("reward")}
                      for g in read_generations(eval_dir)[:SAMPLE_TEXTS]]
    return out
