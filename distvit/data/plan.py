"""Epoch planning: which sample each rank processes at each step, exactly once per epoch.

The plan is global first, then sliced: an epoch's sample order depends only on (seed, epoch); step `s`
takes the global slots `order[s*B:(s+1)*B]` (B = global batch) and rank `r` of `W` takes slots
`[r*B/W, (r+1)*B/W)` of that step. The last step is padded with masked slots, never dropped or filled
with repeated samples, so

- every rank runs the same number of steps (no DDP hang at the end of an epoch),
- the union of valid slots over ranks is the dataset, each sample once,
- a given step processes the same samples whatever the world size (only their split differs).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of range(num_samples) that depends on (seed, epoch) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]))
    return torch.from_numpy(rng.permutation(num_samples).astype(np.int64))


def window_order(shard_sizes: list[int], seed: int, epoch: int, window: int) -> torch.Tensor:
    """A permutation of the samples of shards of `shard_sizes` samples each (stored shard after shard) that
    streaming can afford: the shards in a random order, cut into windows of `window` shards, the samples
    of each window in a random order. Depends on (seed, epoch) only, like epoch_order; a reader needs the
    shards of one or two windows at a time instead of all of them."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, 0x3D0C5]))
    starts = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
    shards = rng.permutation(len(shard_sizes))
    pieces = []
    for first in range(0, len(shards), window):
        members = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards[first : first + window]])
        pieces.append(members[rng.permutation(len(members))])
    return torch.from_numpy(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64))


def subset_indices(num_samples: int, size: int, seed: int) -> torch.Tensor:
    """A fixed random subset of `size` of range(num_samples), sorted; depends on (seed, size) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, size, 0x5B5E7]))
    return torch.from_numpy(np.sort(rng.choice(num_samples, size=size, replace=False)).astype(np.int64))


def sequential_order(num_samples: int) -> torch.Tensor:
    """Stored order, for evaluation."""
    return torch.arange(num_samples, dtype=torch.int64)


def num_steps(num_samples: int, global_batch: int) -> int:
    return -(-num_samples // global_batch)


@dataclass(frozen=True)
class RankBatch:
    step: int
    """Step index within this plan (0 = the first step after `start_sample`)."""
    first_slot: int
    """Global slot where the step starts: identifies the step within the epoch whatever the resume point."""
    indices: torch.Tensor
    """Sample indices for this rank (padding slots hold index 0 and are masked out)."""
    valid: torch.Tensor
    """bool mask of the real samples in `indices`."""
    global_valid: int
    """Real samples in this step over all ranks: the denominator of the step's mean loss."""


class EpochPlan:
    """The slots of one rank for one epoch, from global slot `start_sample` on (resuming mid-epoch: the
    number of samples of the epoch already trained on, by any world size or batch size)."""

    def __init__(self, order: torch.Tensor, global_batch: int, world_size: int, rank: int, start_sample: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.order = order
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.num_samples = int(order.numel())
        if not 0 <= start_sample <= self.num_samples:
            raise ValueError(f"start_sample {start_sample} outside [0, {self.num_samples}]")
        self.start_sample = start_sample
        self.steps = num_steps(self.num_samples - start_sample, global_batch)

    def __len__(self) -> int:
        return self.steps

    def batch(self, step: int) -> RankBatch:
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside [0, {self.steps})")
        step_start = self.start_sample + step * self.global_batch
        global_valid = min(self.global_batch, self.num_samples - step_start)
        first = step_start + self.rank * self.local_batch
        slots = torch.arange(first, first + self.local_batch)
        valid = slots < self.num_samples
        indices = torch.where(valid, self.order[slots.clamp(max=self.num_samples - 1)], torch.zeros_like(slots))
        return RankBatch(step=step, first_slot=step_start, indices=indices, valid=valid, global_valid=global_valid)

    def batches(self, start_step: int = 0) -> Iterator[RankBatch]:
        for step in range(start_step, self.steps):
            yield self.batch(step)
