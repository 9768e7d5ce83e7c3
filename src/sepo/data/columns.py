"""Dataset column names: the contract between stages (docs/architecture.md, "Dataset columns"), in one place.

A pair row always has ``index`` and the token-id columns; later stages add per-token columns aligned with the
response ids (one entry per response token, first token and EOS included).
"""

from __future__ import annotations

INDEX = "index"  # int: the row's position in the source (error messages name rows by it)
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")  # `sepo data prepare`
REWARD_COLUMNS = ("chosen_rewards", "rejected_rewards")  # `sepo score`: r_t per response token
MASK_COLUMNS = ("chosen_mask", "rejected_mask")  # `sepo select`: the key tokens
REF_LOGPS_COLUMNS = ("chosen_ref_logps", "rejected_ref_logps")  # `sepo train`'s reference cache
# Per-token columns belong to one tokenization: re-tokenizing pairs drops them, since they would no longer line up
# with the new ids.
TOKEN_ALIGNED_COLUMNS = (*REWARD_COLUMNS, *MASK_COLUMNS, *REF_LOGPS_COLUMNS)
