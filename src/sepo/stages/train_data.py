"""The checks and splits `sepo train` applies to its pairs once, when it loads them (sepo.stages.train).

Everything a loss relies on per row is checked here, once, on the Arrow columns -- not per micro-batch on the
device: the per-token columns it reads as long as their response ids, at least one token per response, (when the loss trains on
a selection) at least one selected token per response (the precondition of sepo.core.losses), and (when it reads
token rewards) finite rewards.
"""

from __future__ import annotations

from pathlib import Path

from sepo.data.columns import INDEX, MASK_COLUMNS, REWARD_COLUMNS, selection_columns
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


def _flat_values(ds, column: str):
    """A list column's values, flattened, as float64 numpy."""
    import numpy as np
    import pyarrow.compute as pc

    return pc.list_flatten(arrow_table(ds).column(column)).to_numpy(zero_copy_only=False).astype(np.float64)


def check_pairs(ds, source: str, *, needs_selection: bool, needs_token_rewards: bool = False) -> None:
    """Every response has a token; and the per-token columns the run reads are as long as their response ids: (when
    the loss trains on a selection) the selection, none of them empty; (when it reads token rewards) the rewards,
    all finite."""
    import numpy as np

    ids_lengths = {side: list_lengths(ds, f"{side}_input_ids") for side in ("chosen", "rejected")}
    for side, lengths in ids_lengths.items():
        if (lengths == 0).any():
            bad = int(np.flatnonzero(lengths == 0)[0])
            raise DataError("empty response", file=source, row=_row_name(ds, bad), field=f"{side}_input_ids",
                            hint="every response needs at least one token (its EOS); prepare the data again")
    if needs_selection and not all(c in ds.column_names for c in MASK_COLUMNS):
        raise SepoError(f"{source} has no token selection ({', '.join(MASK_COLUMNS)}); this loss trains on selected "
                        "tokens: run `sepo score` and `sepo select` on it first (or use_selection=false)")
    if needs_token_rewards and not all(c in ds.column_names for c in REWARD_COLUMNS):
        raise SepoError(f"{source} has no token rewards ({', '.join(REWARD_COLUMNS)}); this loss reads them: run "
                        "`sepo score` on it and train on the scores (or on the `sepo select` folder made from them)")
    selection = selection_columns(ds.column_names) if needs_selection else ()
    for side_columns in (selection, REWARD_COLUMNS if needs_token_rewards else ()):
        for side, column in zip(("chosen", "rejected"), side_columns):
            ids_len, column_len = ids_lengths[side], list_lengths(ds, column)
            if (ids_len != column_len).any():
                bad = int(np.flatnonzero(ids_len != column_len)[0])
                raise DataError(f"{column} has {column_len[bad]} entries but {side}_input_ids has {ids_len[bad]} "
                                "tokens", file=source, row=_row_name(ds, bad), field=column,
                                hint="the scores or the selection were made for other token ids; run `sepo score` / "
                                "`sepo select` again on this data")
    for side, column in zip(("chosen", "rejected"), selection):
        offsets = np.concatenate([[0], np.cumsum(ids_lengths[side])])
        flat = _flat_values(ds, column)
        selected = np.add.reduceat(flat, offsets[:-1]) if len(flat) else np.zeros(len(ds))
        if not (selected > 0).all():
            bad = int(np.flatnonzero(~(selected > 0))[0])
            raise DataError(f"no token of the {side} response is selected", file=source, row=_row_name(ds, bad),
                            field=column, hint="select with a ratio that keeps at least one token per response (the "
                            "ratio strategy always keeps one; soft weights: --weighting softmax), or drop the row")
    for side, column in zip(("chosen", "rejected"), REWARD_COLUMNS if needs_token_rewards else ()):
        finite = np.isfinite(_flat_values(ds, column))
        if not finite.all():
            row = int(np.searchsorted(np.cumsum(ids_lengths[side]), int(np.flatnonzero(~finite)[0]), side="right"))
            raise DataError(f"a non-finite token reward in the {side} response", file=source,
                            row=_row_name(ds, row), field=column, hint="score the data again (a float32 oracle)")
