"""Prefix sharing: a pair packed as ONE row ``[prompt | chosen | rejected]``, so the prompt is computed once.

The plain batch (``PairBatch``) runs ``prompt + chosen`` and ``prompt + rejected`` as two rows: every pair pays
for its prompt twice (HH-RLHF harmless-base: median prompt 213 tokens against 62 chosen and 82 rejected, so a
pair costs 2·213 + 144 = 570 positions where 357 suffice). Packed, row ``b`` of a batch of B pairs holds

    positions   0 .. P-1        P .. P+C-1          P+C .. P+C+R-1      (then right padding)
    tokens      prompt          chosen              rejected
    position id 0 .. P-1        P .. P+C-1          P .. P+R-1          (rejected restarts after the prompt)
    attends to  causal          prompt + causal     prompt + causal     (rejected never sees chosen)

Every real token then sees exactly the keys, at exactly the position ids, that it sees in its own unpacked row, so
its hidden state -- and every log-prob read from it -- is the unshared one up to floating-point summation order.

The response grid (``response_ids``, ``response_mask``, ``token_weights``, ``ref_logps``: (2B, R), chosen rows
first) is unchanged, so losses do not change. Only where each grid entry is read from moves:
grid row ``n`` reads packed row ``n % B`` (``logit_rows``), at ``logit_positions``:

    chosen token i        P - 1 + i
    rejected token 0      P - 1                   (the last prompt position predicts both first tokens)
    rejected token i > 0  P + C - 1 + i

``with_shared_prefix(batch)`` attaches this layout to a PairBatch (``batch.shared``);
``sepo.models.response_log_probs`` then runs it (``sepo.prefix_sharing``) when the model supports it and falls back
to the plain rows otherwise. The attention mask is built on the device from ``segments`` (B*T*T entries are too
many to collate and copy).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from sepo.data.collate import PairBatch

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # values of SharedPrefix.segments


@dataclass
class SharedPrefix:
    """One packed row per pair (see the module docstring)."""

    input_ids: torch.Tensor  # (B, T) long, right-padded with the batch's pad id
    position_ids: torch.Tensor  # (B, T) long: rejected restarts at P; 0 at padding
    segments: torch.Tensor  # (B, T) long: PROMPT / CHOSEN / REJECTED, PAD at padding
    logit_rows: torch.Tensor  # (2B,) long: the packed row every response-grid row reads (n % B)
    logit_positions: torch.Tensor  # (2B, R) long: the packed position whose logits predict each grid token

    @property
    def num_positions(self) -> int:
        """Real (non-pad) positions the packed forward computes."""
        return int((self.segments != PAD).sum())

    def to(self, device, non_blocking: bool = False) -> SharedPrefix:
        return SharedPrefix(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in fields(self)})

    def allowed(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query t may attend to key s: causal, never a pad key, and a response
        token sees the prompt and its own response only. Every query keeps its own diagonal, so no row of the
        softmax is empty (pad queries are read by nothing)."""
        seg = self.segments  # (B, T)
        t = torch.arange(seg.shape[1], device=seg.device)
        causal = t[None, :] <= t[:, None]  # (T, T): key index <= query index
        q, k = seg[:, :, None], seg[:, None, :]  # (B, T, 1), (B, 1, T)
        allowed = causal & (k != PAD) & ((k == PROMPT) | (k == q))  # (B, T, T)
        allowed |= torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device)
        return allowed[:, None]  # (B, 1, T, T)

    def attention_mask(self, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The custom 4D mask transformers passes to attention unchanged: bool (True = attend) for sdpa; for the
        eager kernel, which adds the mask to the scores, 0 / the dtype's minimum in ``additive_dtype``."""
        allowed = self.allowed()
        if additive_dtype is None:
            return allowed
        zeros = torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(additive_dtype).min)


def pack_shared_prefix(batch: PairBatch, pad_token_id: int) -> SharedPrefix:
    """The packed layout of a two-sided PairBatch (rows b and B+b share their prompt by construction)."""
    if not batch.include_rejected:
        raise ValueError("prefix sharing packs chosen and rejected together; this batch holds the chosen side only")
    b = batch.num_pairs
    prompt = batch.prompt_lengths[:b].tolist()
    chosen_len, rejected_len = (x.tolist() for x in batch.split(batch.response_mask.sum(-1)))
    if min(prompt) < 1:
        raise ValueError("an empty prompt: the first response token has no position to be read from")
    width = max(p + c + r for p, c, r in zip(prompt, chosen_len, rejected_len))
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segments = torch.full((b, width), PAD, dtype=torch.long)
    for i, (p, c, r) in enumerate(zip(prompt, chosen_len, rejected_len)):
        input_ids[i, : p + c] = batch.input_ids[i, : p + c]
        input_ids[i, p + c : p + c + r] = batch.input_ids[b + i, p : p + r]
        position_ids[i, : p + c] = torch.arange(p + c)
        position_ids[i, p + c : p + c + r] = torch.arange(p, p + r)
        segments[i, :p], segments[i, p : p + c], segments[i, p + c : p + c + r] = PROMPT, CHOSEN, REJECTED
    slots = torch.arange(batch.response_ids.shape[1])  # (R,)
    p_, c_ = torch.tensor(prompt)[:, None], torch.tensor(chosen_len)[:, None]  # (B, 1)
    chosen_at = p_ - 1 + slots  # (B, R)
    rejected_at = torch.where(slots == 0, p_ - 1, p_ + c_ - 1 + slots)  # (B, R)
    logit_positions = torch.cat([chosen_at, rejected_at]).clamp(max=width - 1)  # (2B, R); clamped = off the mask
    return SharedPrefix(input_ids=input_ids, position_ids=position_ids, segments=segments,
                        logit_rows=torch.arange(2 * b) % b, logit_positions=logit_positions)


def with_shared_prefix(batch: PairBatch, pad_token_id: int) -> PairBatch:
    """The same batch carrying its packed layout (``batch.shared``); a chosen-only batch (sft) is returned as it
    is: it has nothing to share. Meant for where batches are collated (the CPU, a loader worker)."""
    if not batch.include_rejected:
        return batch
    return replace(batch, shared=pack_shared_prefix(batch.to("cpu"), pad_token_id).to(batch.input_ids.device))
