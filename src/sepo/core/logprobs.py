"""Per-token log-probabilities of response tokens, computed only where they are needed.

The label-shift convention (written down once, tested against a brute-force loop):

    A sequence is ``prompt (P tokens) + response (R tokens)``. The log-prob of response token ``i``
    (0-based, i = 0 is the FIRST response token) is read from the logits at sequence position
    ``P + i - 1`` -- the position *before* the token -- and ``logp_i = log_softmax(logits[P + i - 1])[y_i]``.

So the first response token is scored from the last prompt position, and the EOS that ends the response
is scored too. (The paper's released code slices ``logits[:, :-1]`` against ``labels[:, 1:]`` and then
masks with the response mask shifted the wrong way, silently dropping the first response token.)

The "selective head": gather the hidden states at just those positions (and, for SePO, only at the
selected tokens), project them through the LM head in chunks and log-softmax in fp32. Logits memory is
then ``chunk_size x vocab`` instead of ``batch x length x vocab``. With autograd on, each chunk is
recomputed in the backward pass (activation checkpointing), so the saved state is the hidden rows only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # (M, H) -> (M, V) logits


def response_positions(prompt_lengths: torch.Tensor, num_response_slots: int) -> torch.Tensor:
    """Positions whose logits predict each response token: ``P - 1 + i``.  (N,) -> (N, R)"""
    offsets = torch.arange(num_response_slots, device=prompt_lengths.device)
    return prompt_lengths[:, None] - 1 + offsets[None, :]  # (N, R)


def gather_hidden(hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states at ``positions[mask]``, grid row n reading sequence ``rows[n]`` (default: sequence n; prefix
    sharing reads both sides of a pair from one packed row).  hidden (S, T, H), positions/mask (N, R), rows (N,)
    -> (M, H), M = mask.sum()"""
    if rows is None:
        rows = torch.arange(positions.shape[0], device=hidden.device)
    rows = rows[:, None].expand_as(positions)  # (N, R)
    return hidden[rows[mask], positions[mask]]  # (M, H)


def _chunk_logps(head: Head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (c, V) in fp32: log-softmax over 50k+ classes in bf16 loses ~2 digits
    # log p(target) = -cross_entropy: one fused log-softmax + pick, about 30% faster on CPU than
    # gather - logsumexp (which runs max, subtract, exp, sum and log as separate passes over (c, V)).
    return -F.cross_entropy(logits, targets, reduction="none")  # (c,)


# Default LM-head chunk (response positions per chunk). On CPU a 64 x 50k fp32 chunk stays below glibc's mmap
# threshold, so its buffer is reused instead of page-faulted in afresh; on GPU larger chunks keep the device busy.
CPU_CHUNK_SIZE, GPU_CHUNK_SIZE = 64, 1024


def default_chunk_size(device: torch.device) -> int:
    """The chunk used wherever a caller passes ``chunk_size=None``: per device, never one literal for all."""
    return GPU_CHUNK_SIZE if device.type == "cuda" else CPU_CHUNK_SIZE


# Vocabulary columns per tile of the CPU inference head: a 64 x 8,192 fp32 tile is 2 MiB, so the logits are
# reduced while still in cache instead of being written to and re-read from RAM (1.8x faster at vocab 50k).
VOCAB_TILE = 8192


def _chunk_logps_tiled(weight: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same value as ``_chunk_logps`` for a bias-free linear head: log p(y) = w_y . h - logsumexp_v(w_v . h),
    the log-sum-exp taken tile by tile over the vocabulary (exact: a log-sum-exp of per-tile log-sum-exps)."""
    tiles = [torch.logsumexp(F.linear(h, weight[v : v + VOCAB_TILE]).float(), dim=-1)  # (c,) per tile
             for v in range(0, weight.shape[0], VOCAB_TILE)]
    log_z = torch.logsumexp(torch.stack(tiles, dim=-1), dim=-1)  # (c,)
    target_logits = (h.float() * weight[targets].float()).sum(-1)  # (c,)
    return target_logits - log_z


def rows_log_probs(head: Head, hidden_rows: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """log p(target | row) for flat rows, ``chunk_size`` rows at a time (None: ``default_chunk_size``).
    hidden_rows (M, H), targets (M,) -> (M,) fp32"""
    if hidden_rows.shape[0] == 0:
        return hidden_rows.new_zeros(0, dtype=torch.float32)
    chunk_size = chunk_size or default_chunk_size(hidden_rows.device)
    out = []
    grad = torch.is_grad_enabled() and hidden_rows.requires_grad
    # Without autograd on a CPU (scoring, the reference cache) a plain linear head is reduced tile by tile.
    # GPUs keep the one-matmul path: their memory bandwidth makes the fused cross-entropy the faster one.
    tiled = (not grad and hidden_rows.device.type == "cpu" and isinstance(head, torch.nn.Linear)
             and head.bias is None)
    for start in range(0, hidden_rows.shape[0], chunk_size):
        h, t = hidden_rows[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            out.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False))
        else:
            out.append(_chunk_logps_tiled(head.weight, h, t) if tiled else _chunk_logps(head, h, t))
    return torch.cat(out)


def selective_log_probs(
    hidden: torch.Tensor,
    head: Head,
    prompt_lengths: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probs of response tokens where ``mask`` is True; 0 elsewhere.

    hidden (N, T, H) final hidden states of prompt+response sequences; prompt_lengths (N,);
    response_ids, mask (N, R). Returns (N, R) float32.
    """
    positions = response_positions(prompt_lengths, response_ids.shape[1])  # (N, R)
    return selective_log_probs_at(hidden, head, positions, response_ids, mask, chunk_size)


def selective_log_probs_at(
    hidden: torch.Tensor,
    head: Head,
    positions: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``selective_log_probs`` with the reading positions given: grid token (n, i) is scored from the hidden state
    of sequence ``rows[n]`` (default n) at ``positions[n, i]``.  hidden (S, T, H); positions, response_ids, mask
    (N, R); rows (N,) -> (N, R) float32, 0 off-mask."""
    hidden_rows = gather_hidden(hidden, positions, mask, rows)  # (M, H)
    logps = rows_log_probs(head, hidden_rows, response_ids[mask], chunk_size)  # (M,)
    out = torch.zeros(response_ids.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(mask, logps)  # (N, R)


def full_logits_log_probs(
    logits: torch.Tensor, prompt_lengths: torch.Tensor, response_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The same quantity from materialised full logits (N, T, V): the plain way, used as a fallback
    (e.g. under FSDP, where sub-modules cannot be called on their own) and as the benchmark baseline."""
    positions = response_positions(prompt_lengths, response_ids.shape[1])  # (N, R)
    return full_logits_log_probs_at(logits, positions, response_ids, mask)


def full_logits_log_probs_at(logits: torch.Tensor, positions: torch.Tensor, response_ids: torch.Tensor,
                             mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``full_logits_log_probs`` with the reading positions (and rows, see ``selective_log_probs_at``) given.
    logits (S, T, V); positions, response_ids, mask (N, R); rows (N,) -> (N, R) float32, 0 off-mask."""
    if rows is None:
        rows = torch.arange(positions.shape[0], device=logits.device)
    positions = positions.clamp(0, logits.shape[1] - 1)  # (N, R); clamped entries are off the mask
    picked = logits[rows[:, None], positions]  # (N, R, V): only the rows' reading positions, never (N, T, V)
    logps = torch.log_softmax(picked.float(), dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)  # (N, R)
    return logps.masked_fill(~mask, 0.0)


def _chunk_logps_and_kl(head: Head, ref_head: Head, h: torch.Tensor, ref_h: torch.Tensor, targets: torch.Tensor):
    logp = torch.log_softmax(head(h).float(), dim=-1)  # (c, V)
    ref_logp = torch.log_softmax(ref_head(ref_h).float(), dim=-1)  # (c, V)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (c,) KL(pi_ref || pi_theta) at this position
    return logp.gather(-1, targets[:, None]).squeeze(-1), ref_logp.gather(-1, targets[:, None]).squeeze(-1), kl


def selective_log_probs_and_kl(
    hidden: torch.Tensor,
    head: Head,
    ref_hidden: torch.Tensor,
    ref_head: Head,
    prompt_lengths: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-probs, reference log-probs and the per-token sequential KL ``KL(pi_ref(.|x,y<t) || pi_theta(.|x,y<t))``
    (TDPO needs the reference's full distribution at every response position). Each (N, R) fp32, 0 off-mask."""
    positions = response_positions(prompt_lengths, response_ids.shape[1])  # (N, R)
    return selective_log_probs_and_kl_at(hidden, head, ref_hidden, ref_head, positions, response_ids, mask,
                                         chunk_size)


def selective_log_probs_and_kl_at(
    hidden: torch.Tensor,
    head: Head,
    ref_hidden: torch.Tensor,
    ref_head: Head,
    positions: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``selective_log_probs_and_kl`` with the reading positions (and rows, see ``selective_log_probs_at``) given;
    the policy and the reference read the same positions of their own hidden states."""
    h, ref_h = gather_hidden(hidden, positions, mask, rows), gather_hidden(ref_hidden, positions, mask, rows)  # (M, H)
    targets = response_ids[mask]  # (M,)
    chunk_size = chunk_size or default_chunk_size(hidden.device)
    grad = torch.is_grad_enabled() and h.requires_grad
    parts = []
    for s in range(0, h.shape[0], chunk_size):
        args = (head, ref_head, h[s : s + chunk_size], ref_h[s : s + chunk_size], targets[s : s + chunk_size])
        parts.append(checkpoint(_chunk_logps_and_kl, *args, use_reentrant=False) if grad else _chunk_logps_and_kl(*args))
    outs = []
    for k in range(3):
        flat = torch.cat([p[k] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
        outs.append(torch.zeros(response_ids.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, flat))
    return outs[0], outs[1], outs[2]
