"""The checks and splits `sepo train` applies to its pairs once, when it loads them (sepo.stages.train).

Everything a loss relies on per row is checked here, once, on the Arrow columns -- not per micro-batch on the
device: masks as long as their response ids, at least one token per response, and (when the loss trains on a
selection) at least one selected token per response (the precondition of sepo.core.losses).
"""

from __future__ import annotations

from pathlib import Path

from sepo.data.columns import INDEX, MASK_COLUMNS
from sepo.data.rows import flattened, list_lengths
from sepo.errors import DataError, SepoError
from sepo.io import METADATA_FILE, arrow_table


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
    return flattened(subset(ds, float(size) if size <= 1 else min(int(size), len(ds)), seed))


def split_eval(ds, size: float, seed: int):
    """-> (train, eval): ``size`` < 1 is a fraction, >= 1 a count of rows held out at random."""
    from sepo.data import train_eval_split

    train, held_out = train_eval_split(ds, float(size) if size < 1 else int(size), seed)
    return flattened(train), flattened(held_out)


def _row_name(ds, i: int) -> int:
    """The 1-based row in the data folder (the ``index`` column when present, which points into the source)."""
    return int(ds[int(i)][INDEX]) + 1 if INDEX in ds.column_names else int(i) + 1


def check_pairs(ds, source: str, *, needs_selection: bool) -> None:
    """Every response has a token; every mask is as long as its response ids; and (when the loss trains on a
    selection) no selection is empty."""
    import numpy as np
    import pyarrow.compute as pc

    ids_lengths = {side: list_lengths(ds, f"{side}_input_ids") for side in ("chosen", "rejected")}
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
        ids_len, mask_len = ids_lengths[side], list_lengths(ds, column)
        if (ids_len != mask_len).any():
            bad = int(np.flatnonzero(ids_len != mask_len)[0])
            raise DataError(f"{column} has {mask_len[bad]} entries but {side}_input_ids has {ids_len[bad]} tokens",
                            file=source, row=_row_name(ds, bad), field=column,
                            hint="the selection was made for other token ids; run `sepo select` again on this data")
        if needs_selection:
            flat = pc.list_flatten(arrow_table(ds).column(column)).to_numpy(zero_copy_only=False).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(mask_len)])
            selected = np.add.reduceat(flat, offsets[:-1]) if len(flat) else np.zeros(len(ds), dtype=np.int64)
            selected = np.where(mask_len == 0, 0, selected)
            if (selected == 0).any():
                bad = int(np.flatnonzero(selected == 0)[0])
                raise DataError(f"no token of the {side} response is selected", file=source, row=_row_name(ds, bad),
                                field=column, hint="select with a ratio that keeps at least one token per response "
                                "(the ratio strategy always keeps one), or drop the row")
