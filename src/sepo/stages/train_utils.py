"""Helpers of `sepo train` (sepo.stages.train): data checks, the reference log-prob cache, checkpoints, saving.

Kept out of ``train.run`` so that function reads top to bottom; nothing here owns a training loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from sepo.data.tokenize import TOKEN_COLUMNS
from sepo.errors import DataError, SepoError
from sepo.io import METADATA_FILE, arrow_table, atomic_dir, fingerprint, load_dataset_dir, save_dataset

log = logging.getLogger(__name__)
PAIR_COLUMNS = TOKEN_COLUMNS  # the token-id columns every pair has
MASK_COLUMNS = ("chosen_mask", "rejected_mask")
REF_COLUMNS = ("chosen_ref_logps", "rejected_ref_logps")
CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"


# --------------------------------------------------------------------------- data


def check_data_tokenizer(data: str, tokenizer, policy: str) -> None:
    """A sepo dataset folder must have been tokenized (and its tokens selected) with the policy's tokenizer.

    Checked before the data layer loads it, so a selection made for another tokenizer gets the fix that keeps its
    rewards (`sepo select --policy-tokenizer`), not a re-preparation that would drop them."""
    from sepo.io import read_metadata
    from sepo.models import tokenizer_fingerprint

    if not (Path(data) / METADATA_FILE).is_file():
        return  # raw data: the data layer tokenizes it now, with this tokenizer
    meta = read_metadata(data)
    made_with = meta.get("tokenizer_fingerprint")
    if made_with is None or made_with == tokenizer_fingerprint(tokenizer):
        return
    if meta.get("stage") == "select":
        fix = (f"select again for the policy's tokens: sepo select --scores {meta.get('source') or 'SCORES'} "
               f"--policy-tokenizer {policy} --output NEW_DIR")
    else:
        fix = f"prepare it again: sepo data prepare {meta.get('source') or 'SOURCE'} --tokenizer {policy} --output NEW_DIR"
    raise SepoError(f"{data} was tokenized with tokenizer {meta.get('tokenizer')!r}, not the policy's ({policy}): its "
                    f"token ids (and masks) would mean other tokens; {fix}")


def take_subset(ds, size: float | None, seed: int):
    """A seeded random subset: ``size`` <= 1 is a fraction of the rows, > 1 a count (oracle runs)."""
    from sepo.data import subset

    if size is None:
        return ds
    return subset(ds, float(size) if size <= 1 else min(int(size), len(ds)), seed).flatten_indices()


def split_eval(ds, size: float, seed: int):
    """-> (train, eval): ``size`` < 1 is a fraction, >= 1 a count of rows held out at random."""
    from sepo.data import train_eval_split

    train, held_out = train_eval_split(ds, float(size) if size < 1 else int(size), seed)
    return train.flatten_indices(), held_out.flatten_indices()


def _list_lengths(ds, column: str):
    import pyarrow.compute as pc

    table = arrow_table(ds)
    return pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False)


def _row_name(ds, i: int) -> int:
    """The 1-based row in the data folder (the ``index`` column when present, which points into the source)."""
    return int(ds[int(i)]["index"]) + 1 if "index" in ds.column_names else int(i) + 1


def check_pairs(ds, source: str, *, needs_selection: bool) -> None:
    """Every mask as long as its response ids, and (when the loss trains on a selection) never empty."""
    import numpy as np
    import pyarrow.compute as pc

    ids_lengths = {side: _list_lengths(ds, f"{side}_input_ids") for side in ("chosen", "rejected")}
    for side, lengths in ids_lengths.items():
        if (lengths == 0).any():
            bad = int(np.flatnonzero(lengths == 0)[0])
            raise DataError("empty response", file=source, row=_row_name(ds, bad), field=f"{side}_input_ids",
                            hint="every response needs at least one token (its EOS); prepare the data again")
    if needs_selection and not all(c in ds.column_names for c in MASK_COLUMNS):
        raise SepoError(f"{source} has no token selection ({', '.join(MASK_COLUMNS)}); this loss trains on selected "
                        "tokens: run `sepo score` and `sepo select` on it first (or use_selection=false)")
    for side, column in zip(("chosen", "rejected"), MASK_COLUMNS):
        if column not in ds.column_names:
            continue
        ids_len, mask_len = ids_lengths[side], _list_lengths(ds, column)
        if (ids_len != mask_len).any():
            bad = int(np.flatnonzero(ids_len != mask_len)[0])
            raise DataError(f"{column} has {mask_len[bad]} entries but {side}_input_ids has {ids_len[bad]} tokens",
                            file=source, row=_row_name(ds, bad), field=column,
                            hint="the selection was made for other token ids; run `sepo select` again on this data")
        if needs_selection:
            table = arrow_table(ds)
            flat = pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(mask_len)])
            selected = np.add.reduceat(flat, offsets[:-1]) if len(flat) else np.zeros(len(ds), dtype=np.int64)
            selected = np.where(mask_len == 0, 0, selected)
            if (selected == 0).any():
                bad = int(np.flatnonzero(selected == 0)[0])
                raise DataError(f"no token of the {side} response is selected", file=source, row=_row_name(ds, bad),
                                field=column, hint="select with a ratio that keeps at least one token per response "
                                "(the ratio strategy always keeps one), or drop the row")


def model_fingerprint(name_or_path: str) -> str:
    """Name plus size and mtime of every weight file of a local model (a changed checkpoint -> a new key)."""
    from sepo.models import resolve_path

    path = Path(resolve_path(name_or_path))
    files = []
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".json") and f.is_file():
                st = f.stat()
                files.append((f.name, st.st_size, st.st_mtime_ns))
    return fingerprint(str(path.resolve()) if path.exists() else name_or_path, files)


def rows_of(ds, positions: list[int], columns: list[str]) -> list[dict]:
    picked = ds.select_columns(columns)[positions]
    return [dict(zip(picked, values)) for values in zip(*picked.values())]


def pair_lengths(ds) -> list[int]:
    """prompt + longest response per row: what length bucketing sorts on."""
    p, c, r = (_list_lengths(ds, col) for col in PAIR_COLUMNS)
    return (p + (c > r) * c + (c <= r) * r).tolist()


# --------------------------------------------------------------------------- reference log-prob cache


def reference_cache_dir(data: str, output: str, key: str) -> Path:
    """Beside the data folder when it is a local folder, else inside the output folder."""
    d = Path(data)
    if d.is_dir():
        return d.parent / f"{d.name}.ref-logps" / key
    return Path(output) / "ref-logps" / key


def compute_reference_logps(reference, ds, pad_token_id: int, device, *, batch_size: int, chunk_size: int) -> dict:
    """Per-token reference log-probs of every chosen/rejected response token (float32 lists, row order)."""
    from tqdm.auto import tqdm

    from sepo.data.collate import collate_pairs, length_bucketed_batches
    from sepo.models import response_log_probs

    out = {c: [None] * len(ds) for c in REF_COLUMNS}
    columns = [*PAIR_COLUMNS, "index"] if "index" in ds.column_names else list(PAIR_COLUMNS)
    batches = length_bucketed_batches(pair_lengths(ds), batch_size, shuffle=False)
    with torch.inference_mode():
        for positions in tqdm(batches, desc="reference log-probs", unit="batch", disable=len(batches) < 5):
            batch = collate_pairs(rows_of(ds, positions, columns), pad_token_id).to(device)
            logps = response_log_probs(reference, batch, chunk_size=chunk_size).float().cpu()  # (2B, R)
            if not torch.isfinite(logps[batch.response_mask.cpu()]).all():
                raise SepoError(f"the reference gives non-finite log-probs on dataset rows {batch.index.tolist()}; "
                                "check its weights or load it in float32")
            lengths = batch.response_mask.sum(1).tolist()
            for n in range(2 * batch.num_pairs):
                column = REF_COLUMNS[0] if n < batch.num_pairs else REF_COLUMNS[1]
                out[column][positions[n % batch.num_pairs]] = logps[n, : lengths[n]].numpy()
    return out


def attach_reference_logps(ds, cache: Path, compute) -> Any:
    """``ds`` plus the cached reference columns; ``compute()`` fills the cache when it is missing."""
    import datasets

    if not (cache / METADATA_FILE).is_file():
        columns = compute()
        features = datasets.Features({c: datasets.List(datasets.Value("float32")) for c in REF_COLUMNS})
        save_dataset(datasets.Dataset.from_dict(columns, features=features), cache,
                     {"stage": "train-reference-cache", "num_rows": len(ds)}, overwrite=True)
        log.info("reference log-probs cached in %s", cache)
    else:
        log.info("reference log-probs from the cache %s", cache)
    cached, _ = load_dataset_dir(cache, REF_COLUMNS)
    if len(cached) != len(ds):
        raise SepoError(f"the reference cache {cache} has {len(cached)} rows, the data {len(ds)}; delete it")
    ds = ds.remove_columns([c for c in REF_COLUMNS if c in ds.column_names])
    return datasets.concatenate_datasets([ds, cached], axis=1)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints (those with a state file), oldest first."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.name.startswith("checkpoint-") and (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def save_checkpoint(accelerator, output: Path, step: int, state: dict, save_total_limit: int | None) -> Path:
    """accelerator.save_state into a temporary folder, renamed once complete; the oldest beyond the limit go."""
    root = output / CHECKPOINTS
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit:
            for old in checkpoint_dirs(output)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


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


# --------------------------------------------------------------------------- the final model


def save_final_model(accelerator, model, tokenizer, output: Path, *, merge_lora: bool, metadata: dict) -> None:
    """save_pretrained + tokenizer into a temporary folder, then moved into ``output``; the metadata JSON is
    written last, so its presence means the model is complete."""
    from sepo.io import write_metadata

    tmp = output / f".final-{uuid.uuid4().hex[:8]}"
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards on the main process
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        is_peft = hasattr(unwrapped, "peft_config")
        with atomic_dir(tmp) as folder:
            if is_peft and merge_lora:
                unwrapped.merge_and_unload().save_pretrained(folder, safe_serialization=True)
            elif is_peft:
                unwrapped.save_pretrained(folder, safe_serialization=True)  # the adapter only (peft loads it)
            else:
                unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        (output / METADATA_FILE).unlink(missing_ok=True)
        for f in tmp.iterdir():
            dest = output / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        tmp.rmdir()
        write_metadata(output, metadata)
    accelerator.wait_for_everyone()
