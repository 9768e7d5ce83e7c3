"""The training data loader: seeded, length-bucketed global batches that hold the same pairs for any number of
processes and any split of a step into micro-batches.

An optimizer step consumes one *global batch* of ``G = batch_size x num_processes x accumulation`` pairs.
``GlobalBatchSampler`` cuts every epoch into global batches (``length_bucketed_batches`` with ``seed + epoch``:
rows shuffled, sorted by length inside buckets of 50 global batches, batches shuffled) and each global batch, sorted
by length, into ``num_processes x accumulation`` micro-batches of ``batch_size`` pairs. Micro-batch ``k`` of a step
goes to process ``k % num_processes`` as its accumulation step ``k // num_processes``: that is how accelerate's
``BatchSamplerShard`` deals the batches of a prepared loader (``split_batches=False``: whole batches round-robin, and
every batch is full, so it never wraps around to pad). Which pairs an optimizer step sees therefore depends only on
the seed and ``G``; 1 process with ``batch_size=8`` and 2 processes with ``batch_size=4``, or ``batch_size=4`` with
2 accumulation steps, train on the same pairs.

The last global batch of an epoch is usually short. It is padded up to ``G`` with copies of its own rows marked with
weight 0 (``PairBatch.pair_weights``): they run through the model (every process must run the same number of
micro-batches) but add nothing to the gradient or the metrics. Every micro-batch also carries ``step_pairs``, the
number of pairs that count in its whole step, so the loop can normalise the loss by the step, not the micro-batch
(see ``sepo.stages.train.micro_batch_loss``). Nothing is dropped, whatever the process count.

Collation runs in the loader's workers (``num_workers``), and so does packing a pair batch into one row per pair
(``PairCollator.prefix_sharing``, sepo.data.shared_prefix); the loader has its own random generator, so creating an
iterator draws nothing from torch's global RNG (a resumed run's dropout stays bitwise the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sepo.data.collate import PairBatch, collate_pairs, length_bucketed_batches
from sepo.data.columns import INDEX
from sepo.data.rows import rows_of
from sepo.data.shared_prefix import with_shared_prefix


class Draw(NamedTuple):
    """One pair drawn for a micro-batch."""

    row: int  # position in the dataset
    weight: float  # 1: the pair counts; 0: a copy padding the last global batch of an epoch
    step_pairs: int  # pairs that count in the optimizer step this draw belongs to (all processes, all micro-batches)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Micro-batches (lists of ``Draw``) for ``num_steps`` optimizer steps (default: ``num_epochs`` passes, fractions
    allowed), over as many epochs as that takes; see the module docstring. ``shuffle=False`` keeps a fixed
    length-sorted order (evaluation)."""

    def __init__(self, lengths: Sequence[int], *, batch_size: int, num_processes: int = 1, accumulation: int = 1,
                 seed: int = 0, shuffle: bool = True, num_steps: int | None = None, num_epochs: float = 1.0):
        if not len(lengths):
            raise ValueError("GlobalBatchSampler needs at least one row")
        self.lengths, self.seed, self.shuffle = list(lengths), seed, shuffle
        self.batch_size = batch_size  # read by accelerate's BatchSamplerShard: every micro-batch has exactly this many
        self.drop_last = False  # read by BatchSamplerShard too: nothing is dropped (the short batch is padded)
        self.micro_per_step = num_processes * accumulation
        self.global_batch = batch_size * self.micro_per_step
        self.steps_per_epoch = math.ceil(len(self.lengths) / self.global_batch)
        self.num_steps = num_steps or max(1, math.ceil(num_epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (row lists, each sorted longest first) of one epoch."""
        return length_bucketed_batches(self.lengths, self.global_batch, shuffle=self.shuffle, seed=self.seed + epoch)

    def global_batches(self) -> Iterator[list[int]]:
        """The rows of every optimizer step, in order."""
        epoch, batches = -1, []
        for step in range(self.num_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                batches = self.epoch_batches(epoch)
            yield batches[step % self.steps_per_epoch]

    def rows(self) -> list[int]:
        """Every row some step draws (sorted): with few steps, the only rows that need, e.g., reference log-probs."""
        if self.num_steps >= self.steps_per_epoch:
            return list(range(len(self.lengths)))
        return sorted({row for batch in self.global_batches() for row in batch})

    def __iter__(self) -> Iterator[list[Draw]]:
        for rows in self.global_batches():
            real = len(rows)
            padding = [rows[i % real] for i in range(self.global_batch - real)]
            draws = [Draw(r, 1.0, real) for r in rows] + [Draw(r, 0.0, real) for r in padding]
            for k in range(self.micro_per_step):
                yield draws[k * self.batch_size : (k + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.num_steps * self.micro_per_step


class PairDataset(torch.utils.data.Dataset):
    """A map-style view of a pairs ``datasets.Dataset`` that the loader fetches a micro-batch of ``Draw``s from at
    once (``__getitems__``: one Arrow read per micro-batch, not one per row). ``joined``: columns kept elsewhere and
    looked up by row (an object with ``rows_of(rows) -> list[dict]``, e.g. the reference cache), added to each row."""

    def __init__(self, ds, columns: Sequence[str], joined=None):
        self.ds, self.columns, self.joined = ds, [c for c in columns if c in ds.column_names], joined

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, draws: Sequence[Draw]) -> list[tuple[dict, Draw]]:
        positions = [d.row for d in draws]
        rows = rows_of(self.ds, positions, self.columns)
        extra = self.joined.rows_of(positions) if self.joined is not None else [{}] * len(rows)
        for row, more, draw in zip(rows, extra, draws):
            row.update(more)
            row.setdefault(INDEX, draw.row)
        return list(zip(rows, draws))

    def __getitem__(self, draw: Draw) -> tuple[dict, Draw]:
        return self.__getitems__([draw])[0]


@dataclass
class PairCollator:
    """``collate_pairs`` for the loader's workers (a picklable callable): rows plus their draws -> PairBatch.
    ``prefix_sharing``: also attach the packed layout (``batch.shared``) to two-sided batches, so the model computes
    each prompt once; a chosen-only batch (sft) has nothing to share and stays as it is."""

    pad_token_id: int
    include_rejected: bool = True
    weight_columns: tuple[str, str] | None = None
    ref_columns: tuple[str, str] | None = None
    reward_columns: tuple[str, str] | None = None
    prefix_sharing: bool = False

    def __call__(self, items: Sequence[tuple[dict, Draw]]) -> PairBatch:
        rows, draws = zip(*items)
        batch = collate_pairs(rows, self.pad_token_id, include_rejected=self.include_rejected,
                              weight_columns=self.weight_columns, ref_columns=self.ref_columns,
                              reward_columns=self.reward_columns, pair_weights=[d.weight for d in draws],
                              step_pairs=draws[0].step_pairs)
        return with_shared_prefix(batch, self.pad_token_id) if self.prefix_sharing else batch


def pair_loader(dataset: PairDataset, sampler: GlobalBatchSampler, collate: PairCollator, *,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader of PairBatches (to be passed through ``accelerator.prepare``, which shards it over processes)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        # its own generator: an iterator draws its workers' base seed from it, not from torch's global RNG
        generator=torch.Generator().manual_seed(sampler.seed))
