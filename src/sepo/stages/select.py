"""`sepo select`: choose the key tokens of every scored response (ratio / threshold / mass).

    sepo select --scores runs/scores --output runs/selected --strategy ratio --chosen-ratio 0.3
    sepo select --scores runs/scores --output runs/selected-gpt2 --policy-tokenizer gpt2   # another tokenizer
    sepo select --scores runs/scores --output runs/soft --weighting softmax --weight-quantile 0.9  # soft weights

Output: the scored pairs plus ``chosen_mask`` / ``rejected_mask`` (bool lists aligned with the response
ids), ``chosen_weights`` / ``rejected_weights`` (float lists: the mask as 0/1, or a soft selection with
``--weighting clip|softmax``) and ``sepo_metadata.json`` with the selection statistics. With ``--policy-tokenizer`` the rewards are
first projected onto the policy's tokens through character offsets (``sepo.core.projection``) and the id,
reward and mask columns are all in the policy's tokenization. See docs/select.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sepo import __version__
from sepo.config import option, to_dict, validate_choices
from sepo.core.projection import align_spans, project_rewards, spans_from_pieces
from sepo.core.selection import SIDES, WEIGHTINGS, magnitude_quantile, select, soft_weights
from sepo.data.columns import REWARD_COLUMNS, SELECTION_COLUMNS, TOKEN_COLUMNS
from sepo.errors import ConfigError, DataError, SepoError
from sepo.io import arrow_table, flat_column, load_dataset_dir, owns_output, save_dataset

log = logging.getLogger(__name__)
# rows re-tokenized per batch of tokenizer calls when projecting onto the policy tokenizer (bounds the Python
# lists held at once)
PROJECTION_ROWS = 1024
# tokens decoded before a token to find the text it adds: enough context for SentencePiece's leading space and
# for a multi-byte character split over several byte tokens
PIECE_CONTEXT = 4
SCORED_COLUMNS = (*TOKEN_COLUMNS, *REWARD_COLUMNS)


@dataclass
class SelectConfig:
    """Select key tokens from token-level rewards, optionally in another (policy) tokenizer."""

    scores: str | None = option(None, "a `sepo score` output folder")
    output: str = option("runs/selected", "output dataset folder")
    strategy: str = option("ratio", "ratio: the paper's top/bottom k; threshold: |r| beyond tau; mass: fewest tokens "
                           "covering a fraction of the reward mass", choices=("ratio", "threshold", "mass"))
    chosen_ratio: float = option(0.3, "ratio: share of each chosen response kept (highest rewards)")
    rejected_ratio: float = option(0.3, "ratio: share of each rejected response kept (lowest rewards)")
    threshold: float | None = option(None, "threshold: keep r > tau (chosen) and r < -tau (rejected); none: tau from "
                                     "threshold_quantile")
    threshold_quantile: float = option(0.7, "threshold: tau = this quantile of |r| over every token of the dataset")
    mass: float = option(0.8, "mass: fraction of a response's positive (chosen) / negative (rejected) reward to cover")
    weighting: str = option("hard", "chosen_weights/rejected_weights: hard: the mask as 0/1; clip: clip(s*r/tau_w, 0, "
                            "1); softmax: exp((s*r - max s*r)/tau_w) within a response (s = +1 chosen, -1 rejected)",
                            choices=WEIGHTINGS)
    weight_scale: float | None = option(None, "clip/softmax: the scale tau_w (reward units; softmax's temperature); "
                                        "none: tau_w from weight_quantile")
    weight_quantile: float = option(0.9, "clip/softmax: tau_w = this quantile of |r| over every token of the dataset")
    policy_tokenizer: str | None = option(None, "project rewards onto this tokenizer's tokens (hub id, folder or "
                                          "'stories260k') before selecting; none: the scoring tokenizer")
    batch_rows: int = option(8192, "responses selected per vectorized batch", unit="responses")
    overwrite: bool = option(False, "replace an existing output folder")

    def __post_init__(self):
        validate_choices(self)
        for name in ("chosen_ratio", "rejected_ratio", "threshold_quantile", "mass", "weight_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1] (0.3 means 30%), got {getattr(self, name)}")
        if self.threshold is not None and self.threshold < 0:
            raise ConfigError(f"threshold must be >= 0 (it is applied as r > tau and r < -tau), got {self.threshold}")
        if self.weight_scale is not None and not self.weight_scale > 0:
            raise ConfigError(f"weight_scale must be > 0 (it divides the rewards), got {self.weight_scale}")
        if self.batch_rows < 1:
            raise ConfigError("batch_rows must be >= 1")


# ---------------------------------------------------------------------------------------------- helpers


def check_token_aligned(table, folder: str, kinds: tuple[str, ...] = ("rewards",)) -> None:
    """Refuse per-token columns (``chosen_rewards``, ``rejected_mask``...) whose length differs from their
    response ids: selecting or displaying them would silently attach values to the wrong tokens."""
    import numpy as np
    import pyarrow.compute as pc

    for side in SIDES:
        ids = pc.list_value_length(table.column(f"{side}_input_ids")).to_numpy(zero_copy_only=False)
        for name in (f"{side}_{kind}" for kind in kinds):
            if name not in table.column_names:
                continue
            values = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(values != ids)
            if bad.size:
                i = int(bad[0])
                raise DataError(
                    f"{values[i]} entries for {ids[i]} tokens of {side}_input_ids ({bad.size} row(s) like this)",
                    file=folder, row=i + 1, field=name,
                    hint="the per-token values do not belong to these token ids (was the folder re-tokenized or "
                         "edited?); score the pairs again with `sepo score`")


def pad_rows(values: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor):
    """Rows ``rows`` of a flat list column as a padded grid.  values (M,), lengths (N,), rows (n,) ->
    grid (n, R) fp32, mask (n, R) bool, and (flat, local, col) index vectors (m,) to scatter results back."""
    starts = lengths.cumsum(0) - lengths  # (N,)
    lens = lengths[rows]  # (n,)
    local = torch.repeat_interleave(torch.arange(rows.shape[0]), lens)  # (m,) row of each token
    col = torch.arange(local.shape[0]) - (lens.cumsum(0) - lens)[local]  # (m,) position in its response
    flat = starts[rows][local] + col  # (m,) index into values
    width = max(int(lens.max()) if rows.numel() else 0, 1)
    grid = torch.zeros(rows.shape[0], width, dtype=torch.float32)
    mask = torch.zeros(rows.shape[0], width, dtype=torch.bool)
    grid[local, col] = values[flat].float()
    mask[local, col] = True
    return grid, mask, (flat, local, col)


def map_rows(values: torch.Tensor, lengths: torch.Tensor, fn, batch_rows: int, dtype) -> torch.Tensor:
    """``fn(grid (n, R), mask (n, R)) -> (n, R)`` over a flat column: rows are sorted by length and cut into
    padded batches (little padding), each handled in one vectorized call. values (M,), lengths (N,) -> (M,)."""
    out = torch.zeros(values.shape[0], dtype=dtype)
    order = lengths.argsort(stable=True)
    for b in range(0, order.shape[0], batch_rows):
        rewards, mask, (flat, local, col) = pad_rows(values, lengths, order[b : b + batch_rows])  # (n, R)
        out[flat] = fn(rewards, mask)[local, col]
    return out


def select_flat(values: torch.Tensor, lengths: torch.Tensor, strategy: str, value: float, side: str,
                batch_rows: int) -> torch.Tensor:
    """The selection of every response of a flat column.  values (M,), lengths (N,) -> (M,) bool."""
    return map_rows(values, lengths, lambda r, m: select(r, m, strategy, value, side), batch_rows, torch.bool)


def weigh_flat(values: torch.Tensor, lengths: torch.Tensor, method: str, scale: float, side: str,
               batch_rows: int) -> torch.Tensor:
    """Soft weights (``sepo.core.selection.soft_weights``) of every response of a flat column.  -> (M,) float32"""
    return map_rows(values, lengths, lambda r, m: soft_weights(r, m, method, scale, side), batch_rows, torch.float32)


def list_column(values: torch.Tensor, lengths: torch.Tensor, arrow_type):
    """A flat (M,) tensor and its row lengths (N,) -> an Arrow list column."""
    import pyarrow as pa

    offsets = pa.array(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).numpy().astype("int32"))
    return pa.ListArray.from_arrays(offsets, pa.array(values.numpy(), type=arrow_type))


def side_stats(values: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor) -> dict:
    """Tokens kept, mean reward of selected vs unselected tokens, responses with an empty selection, and the
    weights' mean and responses whose weights are all 0 (training refuses an empty selection either way)."""
    row = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
    kept_per_row = torch.zeros(lengths.shape[0], dtype=torch.long).index_add_(0, row, keep.long())
    weight_per_row = torch.zeros(lengths.shape[0], dtype=torch.float64).index_add_(0, row, weights.double())
    values = values.double()
    return {
        "mean_weight": float(weights.double().mean()) if values.numel() else 0.0,
        "zero_weight_responses": int(((weight_per_row == 0) & (lengths > 0)).sum()),
        "responses": int(lengths.shape[0]), "tokens": int(values.shape[0]), "selected": int(keep.sum()),
        "selected_fraction": float(keep.float().mean()) if values.numel() else 0.0,
        "mean_reward_selected": float(values[keep].mean()) if keep.any() else None,
        "mean_reward_unselected": float(values[~keep].mean()) if (~keep).any() else None,
        "empty_selections": int(((kept_per_row == 0) & (lengths > 0)).sum()),
    }


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, by decoding a short window with and without it (keeps SentencePiece's
    leading spaces and multi-byte characters that single-token decoding would lose); "" where it adds none."""
    out = []
    for i in range(len(ids)):
        before = tokenizer.decode(ids[max(0, i - PIECE_CONTEXT) : i])
        after = tokenizer.decode(ids[max(0, i - PIECE_CONTEXT) : i + 1])
        out.append(after[len(before):] if after.startswith(before) else "")
    return out


def project_to_policy(ds, oracle_tok, policy_tok) -> dict[str, list]:
    """Re-tokenize prompts and responses with the policy tokenizer and project the rewards (see
    sepo.core.projection). Returns the new id and reward columns."""
    special = frozenset(oracle_tok.all_special_ids)
    eos = policy_tok.eos_token_id
    if eos is None:
        raise SepoError("the policy tokenizer has no EOS token; responses must end with one")
    cols: dict[str, list] = {c: [] for c in SCORED_COLUMNS}
    realigned = 0
    for start in range(0, len(ds), PROJECTION_ROWS):
        chunk = ds[start : start + PROJECTION_ROWS]
        cols["prompt_input_ids"] += policy_tok(list(chunk["prompt"]), verbose=False)["input_ids"]
        for side in SIDES:
            texts = list(chunk[side])
            # verbose=False: a response longer than the tokenizer's model_max_length is only being measured here
            oracle_enc = oracle_tok(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            for n, text in enumerate(texts):
                ids = chunk[f"{side}_input_ids"][n]
                spans = align_spans(ids, oracle_enc["input_ids"][n], oracle_enc["offset_mapping"][n], special)
                if spans is None:  # tokenized in the prompt's context: place each token's decoded text instead
                    pieces = [None if t in special else p for t, p in zip(ids, token_pieces(oracle_tok, ids))]
                    spans = spans_from_pieces(pieces, text)
                    realigned += 1
                end = max((e for _, e in spans), default=0)  # a response cut by max_length: only the scored text
                enc = policy_tok(text[:end], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
                policy_spans = [*map(tuple, enc["offset_mapping"]), (end, end)]  # + the policy's EOS, no characters
                rewards = torch.tensor(chunk[f"{side}_rewards"][n], dtype=torch.float64)
                cols[f"{side}_input_ids"].append([*enc["input_ids"], eos])
                cols[f"{side}_rewards"].append(project_rewards(rewards, spans, policy_spans).float().tolist())
    if realigned:
        log.info("%d responses were aligned to their text through decoded token pieces (their ids are not the "
                 "standalone tokenization of the text)", realigned)
    return cols


# ---------------------------------------------------------------------------------------------- run


@owns_output()
def run(cfg: SelectConfig):
    import datasets
    import pyarrow as pa

    from sepo.models import load_tokenizer, tokenizer_fingerprint

    if not cfg.scores:
        raise ConfigError("sepo select needs --scores (a `sepo score` output folder)")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise SepoError(f"{cfg.output} already exists; choose another --output or pass --overwrite")
    started = time.time()

    # ---- 1. load scores ----
    ds, scores_meta = load_dataset_dir(cfg.scores, SCORED_COLUMNS, produced_by="sepo score")
    ds = ds.remove_columns([c for c in SELECTION_COLUMNS if c in ds.column_names])
    check_token_aligned(arrow_table(ds), cfg.scores)
    tokenizer_name, tokenizer_fp = scores_meta.get("tokenizer"), scores_meta.get("tokenizer_fingerprint")

    # ---- 2. cross-tokenizer: project the rewards onto the policy's tokens ----
    if cfg.policy_tokenizer:
        if not tokenizer_name:
            raise SepoError(f"{cfg.scores} records no scoring tokenizer (metadata 'tokenizer'), so its ids cannot be "
                            "turned back into text for --policy-tokenizer; score the data again with `sepo score`")
        oracle_tok = load_tokenizer(tokenizer_name)
        if tokenizer_fp and tokenizer_fingerprint(oracle_tok) != tokenizer_fp:
            raise SepoError(f"the tokenizer recorded in {cfg.scores} ({tokenizer_name}) no longer matches the "
                            "fingerprint it was scored with")
        policy_tok = load_tokenizer(cfg.policy_tokenizer)
        for role, name, tok in (("scoring", tokenizer_name, oracle_tok), ("policy", cfg.policy_tokenizer, policy_tok)):
            if not tok.is_fast:  # a slow tokenizer silently returns no offset mapping
                raise SepoError(f"the {role} tokenizer {name} ({type(tok).__name__}) is not a fast tokenizer, and "
                                "cross-tokenizer selection needs the character offsets only fast ones give; save a "
                                "fast version of it (a tokenizer.json, e.g. AutoTokenizer.from_pretrained(..., "
                                "use_fast=True).save_pretrained(DIR)) and pass that folder")
        projected = project_to_policy(ds, oracle_tok, policy_tok)
        features = datasets.Features({
            **{c: datasets.List(datasets.Value("int64")) for c in SCORED_COLUMNS[:3]},
            **{c: datasets.List(datasets.Value("float32")) for c in SCORED_COLUMNS[3:]}})
        ds = datasets.concatenate_datasets(
            [ds.remove_columns(list(SCORED_COLUMNS)), datasets.Dataset.from_dict(projected, features=features)], axis=1)
        tokenizer_name, tokenizer_fp = cfg.policy_tokenizer, tokenizer_fingerprint(policy_tok)

    # ---- 3. tau for the threshold strategy, tau_w for soft weights ----
    table = arrow_table(ds)
    flat = {side: flat_column(table, f"{side}_rewards") for side in SIDES}
    every = torch.cat([flat["chosen"][0], flat["rejected"][0]])
    tau = cfg.threshold
    if cfg.strategy == "threshold" and tau is None:
        tau = magnitude_quantile(every, cfg.threshold_quantile)
    tau_w = None
    if cfg.weighting != "hard":
        tau_w = cfg.weight_scale if cfg.weight_scale is not None else magnitude_quantile(every, cfg.weight_quantile)
        if not tau_w > 0:
            raise SepoError(f"the {cfg.weight_quantile} quantile of |r| is 0 (most token rewards are 0), so soft weights "
                            "have no scale; raise --weight-quantile or pass --weight-scale")
    value = {"ratio": {"chosen": cfg.chosen_ratio, "rejected": cfg.rejected_ratio},
             "threshold": {"chosen": tau, "rejected": tau},
             "mass": {"chosen": cfg.mass, "rejected": cfg.mass}}[cfg.strategy]

    # ---- 4. select (and weigh), vectorized over length-sorted padded batches ----
    columns, stats = {}, {"strategy": cfg.strategy, "tau": tau, "weighting": cfg.weighting, "weight_scale": tau_w}
    for side in SIDES:
        values, lengths = flat[side]
        keep = select_flat(values, lengths, cfg.strategy, value[side], side, cfg.batch_rows)  # (M,)
        if cfg.weighting == "hard":
            weights = keep.float()
        else:
            weights = weigh_flat(values, lengths, cfg.weighting, tau_w, side, cfg.batch_rows)  # (M,)
        columns[f"{side}_mask"] = list_column(keep, lengths, pa.bool_())
        columns[f"{side}_weights"] = list_column(weights, lengths, pa.float32())
        stats[side] = side_stats(values, lengths, keep, weights)
        if stats[side]["empty_selections"]:
            log.warning("%d %s responses have an empty selection (%s)", stats[side]["empty_selections"], side,
                        "no token beyond tau" if cfg.strategy == "threshold" else
                        "no token pushes the reward the right way" if cfg.strategy == "mass" else
                        "ratio 0" if value[side] == 0 else "empty responses")

    # ---- 5. write ----
    selected = datasets.concatenate_datasets(
        [ds, datasets.Dataset(datasets.table.InMemoryTable(pa.table(columns)))], axis=1)
    metadata = {
        "stage": "select", "sepo_version": __version__, "source": cfg.scores, "tokenizer": tokenizer_name,
        "tokenizer_fingerprint": tokenizer_fp, "num_rows": len(selected), "stats": stats,
        "policy_tokenizer": cfg.policy_tokenizer,
        "scoring_tokenizer": scores_meta.get("tokenizer"),
        "scoring_tokenizer_fingerprint": scores_meta.get("tokenizer_fingerprint"),
        "oracle": scores_meta.get("oracle"), "reference": scores_meta.get("reference"), "beta": scores_meta.get("beta"),
        "seconds": round(time.time() - started, 2), "config": to_dict(cfg),
    }
    save_dataset(selected, cfg.output, metadata, overwrite=cfg.overwrite)
    log.info("selected %s: chosen %d/%d tokens, rejected %d/%d tokens -> %s", cfg.strategy, stats["chosen"]["selected"],
             stats["chosen"]["tokens"], stats["rejected"]["selected"], stats["rejected"]["tokens"], cfg.output)
    return metadata
