"""From canonical tokenized rows to one padded batch, and length-bucketed batch order.

A batch of B pairs becomes ONE forward of 2B sequences: rows ``0..B-1`` are ``prompt + chosen`` and rows
``B..2B-1`` are ``prompt + rejected``, right-padded, so position ids are the default ``0..T-1`` and the
prompt/response boundary of row n is ``prompt_lengths[n]``. Response tokens are also laid out in a
separate (2B, R) grid, the layout every loss and the scorer work in (see ``sepo.core.logprobs``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sepo.data.shared_prefix import SharedPrefix


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (N, T) long; N = 2B (chosen rows first) or B when built with include_rejected=False
    attention_mask: torch.Tensor  # (N, T) long
    prompt_lengths: torch.Tensor  # (N,) long: P, the index of the first response token
    response_ids: torch.Tensor  # (N, R) long, 0 where response_mask is False
    response_mask: torch.Tensor  # (N, R) bool: a real response token
    index: torch.Tensor  # (B,) long: dataset row of each pair (error messages, shard merging)
    token_weights: torch.Tensor | None = None  # (N, R) float: SePO selection (1 = key token), None = all tokens
    ref_logps: torch.Tensor | None = None  # (N, R) float32: cached reference log-probs, None when not cached
    token_rewards: torch.Tensor | None = None  # (N, R) float32: `sepo score`'s r_t (tgdpo), None when not read
    include_rejected: bool = True
    # (B,) float: 1 = the pair counts, 0 = a copy that only pads the last global batch (sepo.data.loader)
    pair_weights: torch.Tensor | None = None
    step_pairs: int | None = None  # pairs that count in this batch's whole optimizer step, over every process
    shared: SharedPrefix | None = None  # the same pairs packed one row each (sepo.data.shared_prefix), or None

    @property
    def num_pairs(self) -> int:
        return int(self.index.shape[0])

    def to(self, device, non_blocking: bool = False) -> PairBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if hasattr(v, "to") else v  # tensors, packed layout
        return PairBatch(**moved)

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B, ...) -> the chosen half and the rejected half."""
        b = self.num_pairs
        return t[:b], t[b:]


def pad_right(seqs: Sequence[Sequence], value, dtype=torch.long, length: int | None = None) -> torch.Tensor:
    """Right-pad lists to one (N, L) tensor (L = the longest, or ``length``)."""
    width = max([len(s) for s in seqs] + [length or 0, 1])
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(list(s), dtype=dtype)
    return out


def collate_pairs(
    rows: Sequence[dict],
    pad_token_id: int,
    *,
    include_rejected: bool = True,
    weight_columns: tuple[str, str] | None = None,
    ref_columns: tuple[str, str] | None = None,
    pair_weights: Sequence[float] | None = None,
    step_pairs: int | None = None,
    reward_columns: tuple[str, str] | None = None,
) -> PairBatch:
    """Rows with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (response ids only) and
    an ``index`` -> PairBatch. ``weight_columns`` e.g. ("chosen_weights", "rejected_weights") from ``sepo select``;
    ``ref_columns`` e.g. ("chosen_ref_logps", "rejected_ref_logps") from the reference cache; ``reward_columns``
    e.g. ("chosen_rewards", "rejected_rewards") from ``sepo score``; ``pair_weights`` and ``step_pairs`` from the
    training loader (``sepo.data.loader``)."""
    sides = ["chosen", "rejected"] if include_rejected else ["chosen"]
    prompts, responses = [], []
    for side in sides:
        for r in rows:
            prompts.append(list(r["prompt_input_ids"]))
            responses.append(list(r[f"{side}_input_ids"]))
    seqs = [p + y for p, y in zip(prompts, responses)]
    input_ids = pad_right(seqs, pad_token_id)  # (N, T)
    attention_mask = pad_right([[1] * len(s) for s in seqs], 0)  # (N, T)
    response_ids = pad_right(responses, 0)  # (N, R)
    response_mask = pad_right([[True] * len(y) for y in responses], False, dtype=torch.bool, length=response_ids.shape[1])

    def grid(columns: tuple[str, str] | None, dtype):
        if columns is None:
            return None
        vals = [list(r[c]) for c, side in zip(columns, ["chosen", "rejected"]) if side in sides for r in rows]
        return pad_right(vals, 0, dtype=dtype, length=response_ids.shape[1])[:, : response_ids.shape[1]]

    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        response_ids=response_ids,
        response_mask=response_mask,
        index=torch.tensor([int(r.get("index", i)) for i, r in enumerate(rows)], dtype=torch.long),
        token_weights=grid(weight_columns, torch.float32),
        ref_logps=grid(ref_columns, torch.float32),
        token_rewards=grid(reward_columns, torch.float32),
        include_rejected=include_rejected,
        pair_weights=None if pair_weights is None else torch.tensor(list(pair_weights), dtype=torch.float32),
        step_pairs=step_pairs,
    )


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    bucket_batches: int = 50,
) -> list[list[int]]:
    """Batches of row indices with little padding: rows are (optionally) shuffled, cut into buckets of
    ``bucket_batches * batch_size`` rows, sorted by length inside each bucket, cut into batches, and the
    batches shuffled. Deterministic for a given seed. Only the last batch of the last bucket can be short.
    (Training draws its batches through ``sepo.data.loader.GlobalBatchSampler``, built on this.)"""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    bucket = max(1, bucket_batches) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: (-lengths[i], i))
        batches += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
