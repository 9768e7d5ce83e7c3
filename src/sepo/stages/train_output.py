"""`sepo train`'s output folder: where a run writes, what it resumes from, and the final model.

A run writes straight into ``--output`` when that folder is new or empty, or when it resumes a run there. When it
replaces a previous run (``--overwrite``, or ``--resume`` with no checkpoint of this config), it is built beside
it, in ``<output>.partial/``, and swapped in only once complete: a replacement killed mid-way costs nothing of the
previous model and checkpoints, and ``--resume`` continues the replacement from its own checkpoints.

    folder = plan_run_folder(output, run_key, resume=..., overwrite=...)   # decides; writes nothing
    folder.create(accelerator)                                             # once the inputs checked out
    ... train into folder.work ...
    save_final_model(accelerator, model, tokenizer, folder, merge_lora=..., metadata=...)   # + the swap
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sepo.errors import SepoError
from sepo.io import METADATA_FILE, atomic_dir
from sepo.stages.checkpoints import CHECKPOINTS, checkpoint_dirs, read_state

log = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"
# names only `sepo train` writes: a folder holding none of them is never deleted or replaced
OURS = {CHECKPOINTS, LOG_FILE, METADATA_FILE, "config.json"}


@dataclass
class RunFolder:
    final: Path  # --output: the finished model ends up here
    work: Path  # where this run writes: ``final``, or ``<final>.partial`` while it replaces a previous run
    run_key: str  # the config's key: its checkpoints carry it, and only a checkpoint with it is resumed
    checkpoint: Path | None = None  # the checkpoint this run resumes from

    @property
    def staged(self) -> bool:
        return self.work != self.final

    @property
    def log_file(self) -> Path:
        return self.work / LOG_FILE

    def create(self, accelerator) -> None:
        """Make the work folder (a stale replacement from another config goes first)."""
        if accelerator.is_main_process:
            if self.staged and self.checkpoint is None and self.work.exists():
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()


def _ours(folder: Path) -> bool:
    return bool(OURS & {p.name for p in folder.iterdir()})


def _latest_matching(folder: Path, run_key: str, overwrite: bool) -> Path | None:
    """The latest checkpoint in ``folder`` made by this config; another config's is an error unless ``overwrite``."""
    checkpoints = checkpoint_dirs(folder)
    if not checkpoints:
        return None
    if read_state(checkpoints[-1]).get("run_key") == run_key:
        return checkpoints[-1]
    if not overwrite:
        raise SepoError(f"{checkpoints[-1]} is from another config or data; rerun with the same settings to resume, or "
                        "pass --overwrite to start again")
    return None


def plan_run_folder(output: str, run_key: str, *, resume: bool, overwrite: bool) -> RunFolder:
    """Decide where the run writes and what it resumes from; refuses what it must not touch. Writes nothing."""
    final = Path(output)
    partial = final.parent / f"{final.name}.partial"
    for path in (final, partial):
        if path.exists() and not path.is_dir():
            raise SepoError(f"{path} exists and is a file, not a folder; choose another --output")
    if resume:
        for work in (partial, final):  # a replacement in progress is newer than the run it replaces
            checkpoint = _latest_matching(work, run_key, overwrite) if work.is_dir() else None
            if checkpoint is not None:
                return RunFolder(final, work, run_key, checkpoint)
        log.info("no checkpoint of this config in %s: starting from the beginning", final)
    if not final.exists() or not any(final.iterdir()):
        return RunFolder(final, final, run_key)
    if not (overwrite or resume):
        raise SepoError(f"{final} already exists; pass --resume to continue it or --overwrite to replace it")
    if not _ours(final):  # never replace a folder a training run did not write
        raise SepoError(f"{final} exists and was not written by sepo train; choose another --output")
    if partial.exists() and any(partial.iterdir()) and not _ours(partial):
        raise SepoError(f"{partial} exists and was not written by sepo train; move it away or choose another --output")
    return RunFolder(final, partial, run_key)


def save_final_model(accelerator, model, tokenizer, folder: RunFolder, *, merge_lora: bool, metadata: dict) -> None:
    """save_pretrained + tokenizer into a temporary folder, moved into the work folder; the metadata JSON is written
    last, so its presence means the model is complete. A replacement run is then swapped in for the old one."""
    from sepo.io import write_metadata
    from sepo.models import is_small_model, transformers_progress

    out = folder.work
    tmp = out / f".final-{uuid.uuid4().hex[:8]}"
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards on the main process
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        is_peft = hasattr(unwrapped, "peft_config")
        with atomic_dir(tmp) as staging, transformers_progress(not is_small_model(unwrapped.parameters())):
            if is_peft and merge_lora:
                unwrapped.merge_and_unload().save_pretrained(staging, safe_serialization=True)
            elif is_peft:
                unwrapped.save_pretrained(staging, safe_serialization=True)  # the adapter only (peft loads it)
            else:
                unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        (out / METADATA_FILE).unlink(missing_ok=True)
        for f in tmp.iterdir():
            dest = out / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        tmp.rmdir()
        write_metadata(out, metadata)
        if folder.staged:
            _swap_in(folder)
    accelerator.wait_for_everyone()


def _swap_in(folder: RunFolder) -> None:
    """The complete replacement takes the previous run's name; the previous run is deleted only after that."""
    old = folder.final.parent / f".{folder.final.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(folder.final, old)
    os.replace(folder.work, folder.final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("replaced the previous run in %s", folder.final)
