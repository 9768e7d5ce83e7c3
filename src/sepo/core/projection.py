"""Cross-tokenizer projection of token rewards through character offsets.

The paper needs oracle and policy to share a tokenizer. Rewards are a property of the response *text*, so
they can be carried over to another tokenization of the same text: each oracle token covers a character
span ``[start, end)`` of the response, each policy token too, and

    r_policy(j) = sum_i r_oracle(i) * |span_i ∩ span_j| / |span_i ∩ (union of policy spans)|

i.e. an oracle token's reward is split over the policy tokens that overlap it, in proportion to the
characters each one covers. When the policy tokens cover all of the oracle token's characters (the usual
case) the denominator is simply the oracle token's length, "the fraction of its characters inside the
policy token".

Tokens without characters (EOS, chat-template specials) and oracle characters that no policy token covers
(a tokenizer whose normaliser drops them): their reward goes to the ``sink`` policy token, by default the
last one, which is the policy's own EOS -- the token that ends the response, as the oracle's EOS did.
Every oracle reward lands somewhere exactly once, so each response's total reward is conserved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Span = tuple[int, int]  # [start, end) character offsets; start == end: a token without characters


def overlap_matrix(src_spans: torch.Tensor, dst_spans: torch.Tensor) -> torch.Tensor:
    """Characters shared by every (source, destination) token pair.  (S, 2), (D, 2) -> (S, D) float64"""
    start = torch.maximum(src_spans[:, None, 0], dst_spans[None, :, 0])  # (S, D)
    end = torch.minimum(src_spans[:, None, 1], dst_spans[None, :, 1])  # (S, D)
    return (end - start).clamp_min(0).double()


def project_rewards(src_rewards: torch.Tensor, src_spans: Sequence[Span] | torch.Tensor,
                    dst_spans: Sequence[Span] | torch.Tensor, sink: int = -1) -> torch.Tensor:
    """Carry rewards of source (oracle) tokens onto destination (policy) tokens of the same text.

    src_rewards (S,); src_spans (S, 2); dst_spans (D, 2), D >= 1. Returns (D,) in src_rewards' dtype with
    ``sum(out) == sum(src_rewards)`` up to rounding. ``sink``: destination index receiving the rewards of
    source tokens that overlap no destination token.

    Example: text "ab cd", oracle tokens "ab"(0,2) r=1.0, " cd"(2,5) r=3.0, EOS(5,5) r=0.5; policy tokens
    "a"(0,1), "b c"(1,4), "d"(4,5), EOS(5,5) -> [0.5, 0.5 + 2.0, 1.0, 0.5] (sum 4.5 = 1 + 3 + 0.5).
    """
    src = torch.as_tensor(src_spans, dtype=torch.long).reshape(-1, 2)  # (S, 2)
    dst = torch.as_tensor(dst_spans, dtype=torch.long).reshape(-1, 2)  # (D, 2)
    if dst.shape[0] == 0:
        raise ValueError("cannot project rewards onto a response with no tokens")
    if src.shape[0] != src_rewards.shape[0]:
        raise ValueError(f"{src_rewards.shape[0]} rewards but {src.shape[0]} spans")
    overlap = overlap_matrix(src, dst)  # (S, D)
    covered = overlap.sum(dim=1, keepdim=True)  # (S, 1)
    weights = overlap / covered.clamp_min(1.0)  # (S, D): each row sums to 1, or to 0 when nothing overlaps
    orphan = covered.squeeze(1) == 0  # (S,)
    weights[orphan, sink] = 1.0
    out = src_rewards.double() @ weights  # (D,)
    return out.to(src_rewards.dtype)


def align_spans(ids: Sequence[int], text_ids: Sequence[int], text_offsets: Sequence[Span],
                special_ids: set[int] | frozenset[int]) -> list[Span] | None:
    """Character spans for stored token ``ids`` of a response, from a fresh tokenization of its text.

    ``text_ids`` / ``text_offsets`` tokenize the response text (no special tokens added). The stored ids
    must begin with the text's tokens (a prefix is fine: the data layer cuts long responses from the
    right); whatever follows must be special tokens (EOS, template end markers), which get an empty span
    at the end of the covered text. Returns None when the ids do not match the text (the caller names the
    row in its error).
    """
    n = 0
    while n < min(len(ids), len(text_ids)) and ids[n] == text_ids[n]:
        n += 1
    rest = ids[n:]
    if any(t not in special_ids for t in rest):
        return None
    spans = [(int(s), int(e)) for s, e in text_offsets[:n]]
    end = spans[-1][1] if spans else 0
    return spans + [(end, end)] * len(rest)


def spans_from_pieces(pieces: Sequence[str | None], text: str) -> list[Span]:
    """Character spans of tokens from the text each one decodes to, placed left to right in ``text``.

    The fallback of ``align_spans`` for ids that are not the text's own tokenization (a response tokenized
    in the context of its prompt, a chat template's whitespace rules). A piece is looked up from the end of
    the previous one, skipping only whitespace (a SentencePiece piece may carry a space the text lacks, so
    the piece without its surrounding whitespace is tried too). A piece "" (a real token that decodes to
    nothing on its own, like a lone SentencePiece "▁") takes the whitespace run at the cursor. ``None``
    (special tokens) and a piece that cannot be placed get an empty span, so their reward goes to the
    projection's sink.

    e.g. pieces ["He", " said", None] in "He said" -> [(0, 2), (2, 7), (7, 7)];
         pieces ["", "s"] in " s" -> [(0, 1), (1, 2)].
    """
    spans: list[Span] = []
    cursor = 0
    for piece in pieces:
        placed = None
        if piece == "":
            end = cursor
            while end < len(text) and text[end].isspace():
                end += 1
            placed = (cursor, end) if end > cursor else None
        for candidate in (piece, piece.strip()) if piece else ():
            pos = text.find(candidate, cursor) if candidate else -1
            if pos != -1 and not text[cursor:pos].strip():
                placed = (pos, pos + len(candidate))
                break
        spans.append(placed or (cursor, cursor))
        cursor = placed[1] if placed else cursor
    return spans
