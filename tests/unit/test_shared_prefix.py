"""The packed layout of prefix sharing (sepo.data.shared_prefix), checked by hand; no model involved."""

from __future__ import annotations

import pytest
import torch

from sepo.data.collate import collate_pairs
from sepo.data.shared_prefix import CHOSEN, PAD, PROMPT, REJECTED, pack_shared_prefix, with_shared_prefix

ROWS = [
    {"index": 0, "prompt_input_ids": [11, 12, 13], "chosen_input_ids": [21, 22], "rejected_input_ids": [31]},
    {"index": 1, "prompt_input_ids": [14], "chosen_input_ids": [23], "rejected_input_ids": [32, 33, 34]},
]


def test_packed_rows_positions_and_reading_positions_by_hand():
    """Pair 0: prompt 11 12 13 | chosen 21 22 | rejected 31          -> 6 positions, no padding
    Pair 1: prompt 14 | chosen 23 | rejected 32 33 34                -> 5 positions + 1 pad (id 0)
    position ids: pair 0 -> 0 1 2 | 3 4 | 3 (rejected restarts at P = 3); pair 1 -> 0 | 1 | 1 2 3 | 0 (pad)
    The grid is (4, 3): rows chosen0, chosen1, rejected0, rejected1; R = 3 (the longest response).
    Reading positions (P - 1 + i for chosen; P - 1 for rejected token 0, P + C - 1 + i after):
      chosen0   2 3 [4]        (slot 2 is off the mask: clamped value, never read)
      chosen1   0 [1 2]
      rejected0 2 [5 6]->clamped to 5 (width 6)
      rejected1 0 2 3          (token 0 from the prompt's last position 0; tokens 1, 2 from positions 2, 3)"""
    batch = collate_pairs(ROWS, pad_token_id=0)
    s = pack_shared_prefix(batch, pad_token_id=0)
    assert s.input_ids.tolist() == [[11, 12, 13, 21, 22, 31], [14, 23, 32, 33, 34, 0]]
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 3, 0]]
    assert s.segments.tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED], [PROMPT, CHOSEN] + [REJECTED] * 3 + [PAD]]
    assert s.logit_rows.tolist() == [0, 1, 0, 1]
    on = batch.response_mask
    assert s.logit_positions[on].tolist() == [2, 3, 0, 2, 0, 2, 3]  # row-major over the real tokens
    assert s.logit_positions.max() < s.input_ids.shape[1]
    assert s.num_positions == 11  # 6 + 5 real positions; the plain rows compute 6 + 6 + 2 + 4 = 18


def test_attention_mask_is_causal_and_hides_chosen_from_rejected():
    """Pair 0 (prompt p0 p1 p2, chosen c0 c1, rejected r0): row = query, column = key, 1 = may attend.
         p0 p1 p2 c0 c1 r0
    p0    1  .  .  .  .  .
    p1    1  1  .  .  .  .
    p2    1  1  1  .  .  .
    c0    1  1  1  1  .  .
    c1    1  1  1  1  1  .
    r0    1  1  1  .  .  1      <- r0 sees the prompt and itself, never c0 / c1
    Pair 1's pad (last position) attends only to itself: no real query ever sees it."""
    s = pack_shared_prefix(collate_pairs(ROWS, pad_token_id=0), pad_token_id=0)
    allowed = s.allowed()  # (2, 1, 6, 6)
    assert allowed.shape == (2, 1, 6, 6)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0, 0], expected)
    assert not allowed[1, 0, :5, 5].any()  # the pad key is seen by no real query
    assert allowed[1, 0, 4, 2:5].all() and not allowed[1, 0, 4, 1]  # rejected token 2 sees r0..r2, not c0
    additive = s.attention_mask(torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, allowed)
    assert (additive[~allowed] == torch.finfo(torch.float32).min).all()


def test_with_shared_prefix_keeps_the_grid_and_moves_with_the_batch():
    batch = collate_pairs(ROWS, pad_token_id=0)
    shared = with_shared_prefix(batch, pad_token_id=0)
    assert shared.shared is not None and batch.shared is None
    for name in ("input_ids", "prompt_lengths", "response_ids", "response_mask", "index"):
        assert torch.equal(getattr(shared, name), getattr(batch, name))  # losses see the same grid
    moved = shared.to("cpu")
    assert torch.equal(moved.shared.input_ids, shared.shared.input_ids)
    chosen_only = collate_pairs(ROWS, pad_token_id=0, include_rejected=False)
    assert with_shared_prefix(chosen_only, pad_token_id=0) is chosen_only  # sft: nothing to share
    with pytest.raises(ValueError, match="chosen side only"):
        pack_shared_prefix(chosen_only, pad_token_id=0)
    empty = [dict(ROWS[0], prompt_input_ids=[])]
    with pytest.raises(ValueError, match="empty prompt"):
        pack_shared_prefix(collate_pairs(empty, pad_token_id=0), pad_token_id=0)
