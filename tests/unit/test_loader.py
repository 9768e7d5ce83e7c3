"""The training loader's global batches: the same pairs per optimizer step for any process count and any split into
micro-batches (dealt by accelerate's own BatchSamplerShard), nothing dropped, the last batch padded with zero-weight
copies; and the per-step loss normalisation that makes the gradient the mean over the step's pairs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.testing import assert_close

from sepo.data.loader import Draw, GlobalBatchSampler, PairCollator, PairDataset
from sepo.stages.train import micro_batch_loss

LENGTHS = [5, 9, 3, 12, 7, 7, 1, 4, 10, 2, 8, 6, 11]  # 13 rows: a global batch of 8 leaves a short last one


def steps_as_dealt(batch_size: int, processes: int, accumulation: int, num_steps: int) -> list[Counter]:
    """What each optimizer step trains on when accelerate deals the sampler to ``processes`` processes: every
    process's ``accumulation`` micro-batches of the step, as a multiset of (row, weight, step_pairs)."""
    sampler = GlobalBatchSampler(LENGTHS, batch_size=batch_size, num_processes=processes, accumulation=accumulation,
                                 seed=7, num_steps=num_steps)
    per_process = [list(BatchSamplerShard(sampler, num_processes=processes, process_index=p) if processes > 1
                        else sampler) for p in range(processes)]
    assert len({len(batches) for batches in per_process}) == 1  # every process runs as many micro-batches
    steps = []
    for s in range(num_steps):
        drawn = Counter()
        for batches in per_process:
            for micro in batches[s * accumulation : (s + 1) * accumulation]:
                assert len(micro) == batch_size
                drawn.update(micro)
        steps.append(drawn)
    return steps


def test_a_step_holds_the_same_pairs_for_any_split_of_the_global_batch():
    reference = steps_as_dealt(8, 1, 1, num_steps=5)  # 2 steps per epoch: 5 steps cross two epoch boundaries
    for batch_size, processes, accumulation in [(4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (2, 4, 1)]:
        assert steps_as_dealt(batch_size, processes, accumulation, num_steps=5) == reference, (
            batch_size, processes, accumulation)


def test_every_row_once_per_epoch_and_the_short_batch_padded_with_zero_weight_copies():
    """13 rows in global batches of 8: one step of 8 real pairs and one of 5 real + 3 copies of weight 0."""
    sampler = GlobalBatchSampler(LENGTHS, batch_size=4, num_processes=2, accumulation=1, seed=1)
    assert sampler.steps_per_epoch == 2 and len(sampler) == 4  # micro-batches per epoch: 2 steps x 2 processes
    draws = [d for micro in sampler for d in micro]
    assert sorted(d.row for d in draws if d.weight == 1) == list(range(13))
    padding = [d for d in draws if d.weight == 0]
    assert len(padding) == 3 and all(d.step_pairs == 5 for d in padding)
    assert sorted(Counter(d.step_pairs for d in draws if d.weight == 1).values()) == [5, 8]
    assert sampler.rows() == list(range(13))


def test_a_new_seed_per_epoch_and_few_steps_draw_few_rows():
    sampler = GlobalBatchSampler(LENGTHS, batch_size=2, seed=3, num_steps=1)
    assert sampler.rows() == sorted(d.row for micro in sampler for d in micro) and len(sampler.rows()) == 2
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)  # each epoch reshuffled with seed + epoch
    two_epochs = GlobalBatchSampler(LENGTHS, batch_size=2, seed=3, num_steps=2 * sampler.steps_per_epoch)
    batches = list(two_epochs.global_batches())
    assert batches == sampler.epoch_batches(0) + sampler.epoch_batches(1)


def test_the_micro_batches_of_a_step_are_sorted_by_length():
    sampler = GlobalBatchSampler(LENGTHS, batch_size=2, accumulation=4, seed=0)
    for batch in sampler.global_batches():
        assert [LENGTHS[r] for r in batch] == sorted((LENGTHS[r] for r in batch), reverse=True)


def test_the_collator_carries_weights_and_step_pairs():
    import datasets

    ds = datasets.Dataset.from_dict({"prompt_input_ids": [[1, 2], [3]], "chosen_input_ids": [[4, 2], [5, 6, 2]],
                                     "rejected_input_ids": [[7, 2], [2]], "chosen_mask": [[1, 0], [0, 1, 1]],
                                     "rejected_mask": [[1, 1], [1]]})
    items = PairDataset(ds, ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "chosen_mask",
                             "rejected_mask", "index"]).__getitems__([Draw(1, 1.0, 3), Draw(0, 0.0, 3)])
    batch = PairCollator(0, weight_columns=("chosen_mask", "rejected_mask"))(items)
    assert batch.index.tolist() == [1, 0]  # no index column: the dataset position
    assert batch.pair_weights.tolist() == [1.0, 0.0] and batch.step_pairs == 3
    assert batch.token_weights[0].tolist() == [0.0, 1.0, 1.0] and batch.input_ids.shape == (4, 4)
    assert batch.shared is None

    import pickle

    packing = pickle.loads(pickle.dumps(PairCollator(0, prefix_sharing=True)))  # as a loader worker receives it
    packed = packing(items).shared  # rows [prompt | chosen | rejected]: [3 5 6 2 2], [1 2 4 2 7 2]
    assert packed.input_ids.tolist() == [[3, 5, 6, 2, 2, 0], [1, 2, 4, 2, 7, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 1, 0], [0, 1, 2, 3, 2, 3]]
    chosen_only = PairCollator(0, include_rejected=False, prefix_sharing=True)(items)  # sft: nothing to share
    assert chosen_only.shared is None and chosen_only.num_pairs == 2


def test_micro_batch_loss_makes_the_step_gradient_the_mean_over_its_pairs():
    """One step of 6 real pairs (losses l = 1..6) and 2 padding copies, dealt to 2 processes x 2 micro-batches of 2:

        process 0: [l1, l2], [l5, l6]      process 1: [l3, l4], [pad, pad]      (weights 1 1 | 1 1 | 1 1 | 0 0)
        micro-batch loss = sum w l * (2 * 2) / 6, e.g. [l1, l2] -> 3 * 4 / 6 = 2
        accelerate divides by accumulation 2, DDP averages over 2 processes:
        (2 + 7.3333) / 2 / 2 + (4.6667 + 0) / 2 / 2 = 3.5 = mean(1..6)
    """
    losses = torch.tensor([1.0, 2, 3, 4, 5, 6, 9, 9])  # the 9s are padding copies
    weights = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0])
    micro = [slice(0, 2), slice(4, 6), slice(2, 4), slice(6, 8)]  # process 0: m0, m1; process 1: m2, m3
    parts = [micro_batch_loss(losses[s], weights[s], 6, 2, 2) for s in micro]
    assert_close(torch.stack(parts), torch.tensor([2.0, 22 / 3, 14 / 3, 0.0]))
    assert_close(sum(parts) / 2 / 2, torch.tensor(3.5))
    # the same step on one process in one micro-batch of 8 gives the same value
    assert_close(micro_batch_loss(losses, weights, 6, 1, 1), torch.tensor(3.5))


def test_the_sampler_refuses_no_rows():
    with pytest.raises(ValueError):
        GlobalBatchSampler([], batch_size=2)
