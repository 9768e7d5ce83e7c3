"""PairBatch layout and length-bucketed batch order."""

from __future__ import annotations

import torch

from sepo.data.collate import collate_pairs, length_bucketed_batches

ROWS = [
    {"index": 7, "prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 2], "rejected_input_ids": [9, 10, 11, 2],
     "chosen_mask": [True, False], "rejected_mask": [False, True, True, False]},
    {"index": 9, "prompt_input_ids": [5], "chosen_input_ids": [12, 13, 2], "rejected_input_ids": [2],
     "chosen_mask": [False, True, True], "rejected_mask": [True]},
]


def test_pairs_become_one_forward_of_2B_rows():
    """Rows 0..B-1 = prompt+chosen, B..2B-1 = prompt+rejected, right-padded with the given pad id (0 here -> 99)."""
    b = collate_pairs(ROWS, pad_token_id=99, weight_columns=("chosen_mask", "rejected_mask"))
    assert b.input_ids.tolist() == [
        [5, 6, 7, 8, 2, 99, 99],
        [5, 12, 13, 2, 99, 99, 99],
        [5, 6, 7, 9, 10, 11, 2],
        [5, 2, 99, 99, 99, 99, 99],
    ]
    assert b.attention_mask.sum(1).tolist() == [5, 4, 7, 2]
    assert b.prompt_lengths.tolist() == [3, 1, 3, 1]
    assert b.response_ids.tolist() == [[8, 2, 0, 0], [12, 13, 2, 0], [9, 10, 11, 2], [2, 0, 0, 0]]
    assert b.response_mask.sum(1).tolist() == [2, 3, 4, 1]
    assert b.token_weights.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    assert b.index.tolist() == [7, 9] and b.num_pairs == 2
    chosen, rejected = b.split(b.response_ids)
    assert torch.equal(chosen, b.response_ids[:2]) and torch.equal(rejected, b.response_ids[2:])


def test_chosen_only_batches_for_sft():
    b = collate_pairs(ROWS, pad_token_id=0, include_rejected=False)
    assert b.input_ids.shape[0] == 2 and b.response_ids.tolist() == [[8, 2, 0], [12, 13, 2]]


def test_buckets_cut_padding_and_are_deterministic():
    lengths = [1, 50, 2, 49, 3, 48, 4, 47] * 4
    batches = length_bucketed_batches(lengths, 4, shuffle=True, seed=3)
    assert batches == length_bucketed_batches(lengths, 4, shuffle=True, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # sorted inside buckets: every batch holds only short or only long rows
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in batches)
    assert batches != length_bucketed_batches(lengths, 4, shuffle=True, seed=4)
    # 32 rows in batches of 5: only the last batch is short (the training loader pads it, sepo.data.loader)
    assert [len(b) for b in length_bucketed_batches(lengths, 5, shuffle=False)] == [5] * 6 + [2]
