"""Dataset column names: the contract between stages (docs/architecture.md, "Dataset columns"), in one place.

A pair row always has ``index`` and the token-id columns; later stages add per-token columns aligned with the
response ids (one entry per response token, first token and EOS included).
"""

from __future__ import annotations

INDEX = "index"  # int: the row's position in the source (error messages name rows by it)
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")  # `sepo data prepare`
REWARD_COLUMNS = ("chosen_rewards", "rejected_rewards")  # `sepo score`: r_t per response token
MASK_COLUMNS = ("chosen_mask", "rejected_mask")  # `sepo select`: the key tokens
SOFT_WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")  # `sepo select`: the mask as 0/1, or soft weights
SELECTION_COLUMNS = (*MASK_COLUMNS, *SOFT_WEIGHT_COLUMNS)  # everything `sepo select` adds
REF_LOGPS_COLUMNS = ("chosen_ref_logps", "rejected_ref_logps")  # `sepo train`'s reference cache
# Per-token columns belong to one tokenization: re-tokenizing pairs drops them, since they would no longer line up
# with the new ids.
TOKEN_ALIGNED_COLUMNS = (*REWARD_COLUMNS, *SELECTION_COLUMNS, *REF_LOGPS_COLUMNS)


def selection_columns(column_names) -> tuple[str, str]:
    """The selection a training run reads from a `sepo select` folder: the per-token weights (0/1 for a hard
    selection, in [0, 1] for a soft one) or, in a folder selected before the weights existed, the boolean masks."""
    return SOFT_WEIGHT_COLUMNS if all(c in column_names for c in SOFT_WEIGHT_COLUMNS) else MASK_COLUMNS
