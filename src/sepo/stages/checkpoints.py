"""Training checkpoints: saved atomically, resumed without unpickling anything but tensors.

``<run>/checkpoints/checkpoint-<step>/`` holds ``accelerator.save_state`` (the model as safetensors; the optimizer
and the RNG states as torch files that accelerate 1.x reads back with ``weights_only=True``) plus
``train_state.json``: the step, the run key, the last logged metrics and the learning-rate scheduler's state (as JSON:
the scheduler is not registered with accelerate, which would pickle it and unpickle it with ``weights_only=False``).

Loading is refused, with one clear error, for a checkpoint holding any file sepo does not write, or one whose
torch files do not load as plain tensors and numbers (``torch.load(weights_only=True)``) -- e.g. a crafted
``random_states_0.pkl`` that would run code when unpickled. What remains trusted: the sharded model and optimizer
folders of an FSDP ``SHARDED_STATE_DICT`` run carry a ``.metadata`` file that torch.distributed.checkpoint reads
with ``pickle``, and DeepSpeed's engine loads its own checkpoint files; resume such runs only from folders you trust.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

from sepo.errors import SepoError

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"
# what accelerate's save_state writes for one model and one optimizer (and a GradScaler under fp16), plus our JSON
PLAIN_FILES = re.compile(r"^(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|"
                         + re.escape(STATE_FILE) + r")$")
# accelerate loads these with weights_only=True too, but swallows a failure (and then continues with a fresh RNG)
RNG_FILES = re.compile(r"^random_states_\d+\.pkl$")
# sharded engines write folders whose loading sepo does not control (see the module docstring)
ENGINE_ENTRIES = {"FSDP": re.compile(r"^(pytorch_model_fsdp_\d+|optimizer_\d+|pytorch_model_fsdp(_\d+)?\.bin|"
                                     r"pytorch_model_fsdp(_\d+)?_rank\d+\.bin|optimizer(_\d+)?_rank\d+\.bin)$"),
                  "DEEPSPEED": re.compile(r"^(pytorch_model|latest|zero_to_fp32\.py)$")}


def checkpoint_dirs(run_folder: Path) -> list[Path]:
    """Complete checkpoints (those with a state file), oldest first."""
    root = run_folder / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if re.fullmatch(r"checkpoint-\d+", d.name) and (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def read_state(checkpoint: Path) -> dict:
    """The checkpoint's ``train_state.json``; an unreadable one is a clear error."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SepoError(f"{checkpoint / STATE_FILE} cannot be read ({e}); delete {checkpoint} to resume from an "
                        "earlier checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise SepoError(f"{checkpoint / STATE_FILE} is not a sepo train state; delete {checkpoint}")
    return state


def save_checkpoint(accelerator, run_folder: Path, state: dict, save_total_limit: int | None) -> Path:
    """accelerator.save_state into a temporary folder, renamed once complete; the oldest beyond the limit go.
    ``state`` (JSON) must hold ``step``."""
    root = run_folder / CHECKPOINTS
    final = root / f"checkpoint-{state['step']}"
    tmp = root / f".checkpoint-{state['step']}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit:
            for old in checkpoint_dirs(run_folder)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_checkpoint(checkpoint: Path, engine: str) -> None:
    """Refuse a checkpoint that holds anything sepo does not write, or a torch file that is not plain data."""
    # torch.load(weights_only=True), allowing numpy's RNG arrays
    from accelerate.utils import load as load_weights_only

    allowed_engine = ENGINE_ENTRIES.get(engine)
    for entry in sorted(checkpoint.iterdir()):
        if PLAIN_FILES.match(entry.name) and entry.is_file():
            continue
        if allowed_engine is not None and allowed_engine.match(entry.name):
            continue
        hint = (" (an older sepo pickled the scheduler there; start again with --overwrite)"
                if entry.name.startswith("custom_checkpoint_") else "")
        raise SepoError(f"{checkpoint} holds {entry.name}, which sepo train does not write: refusing to resume from "
                        f"it{hint}. Resume only from checkpoints this tool made, in folders you trust")
    for entry in sorted(checkpoint.iterdir()):
        if RNG_FILES.match(entry.name):
            try:
                load_weights_only(entry, map_location="cpu")
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
                raise SepoError(f"{entry} does not load as plain tensors and numbers (torch.load weights_only=True: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}); refusing to resume from "
                                f"{checkpoint}. Delete it to resume from an earlier checkpoint") from None


def load_checkpoint(accelerator, checkpoint: Path, scheduler) -> dict:
    """Model, optimizer and RNG states through accelerate (tensors only), the scheduler from the JSON state;
    -> the train state (step, metrics, ...)."""
    state = read_state(checkpoint)
    if "scheduler" not in state:
        raise SepoError(f"{checkpoint} has no scheduler state (made by an older sepo); start again with --overwrite")
    check_checkpoint(checkpoint, accelerator.distributed_type.value)
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as e:  # the optimizer (or GradScaler) file: the model is safetensors
        raise SepoError(f"{checkpoint}: optimizer.bin (or scaler.pt) does not load as plain tensors (weights_only=True: "
                        f"{str(e).splitlines()[0][:200]}); refusing to resume from it") from None
    scheduler.load_state_dict(state["scheduler"])
    return state


def truncate_log(path: Path, step: int) -> None:
    """Drop the JSONL records a killed run wrote after the checkpoint it resumes from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
