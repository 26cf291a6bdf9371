"""The data a run trains and evaluates on, and the order it takes them in.

The global plan (`data.plan`) tells each rank which samples to take at each step, and the batch source
(`data.loader`) delivers exactly those, as uint8; so every rank runs the same number of steps and every
sample is seen once per epoch, also across a resume with another world size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from distvit.config import DataConfig, TrainConfig
from distvit.data.cache import ShardCache
from distvit.data.loader import MemoryBatches, loader_workers, open_batches
from distvit.data.manifest import Manifest
from distvit.data.memory import SplitTensors
from distvit.data.plan import (
    EpochPlan,
    RankBatch,
    epoch_order,
    num_steps,
    sequential_order,
    subset_indices,
    window_order,
)
from distvit.data.preflight import bad_shards_message, describe, without_shards
from distvit.data.transforms import BatchTransform
from distvit.engine.features import compute_features
from distvit.errors import DataError


def agree_on_bad_shards(cfg: DataConfig, manifest: Manifest, bad: dict[str, str], accelerator: Accelerator) -> Manifest:
    """Unite the preflight findings of all ranks (node-local copies may differ), then stop every rank
    with the same error, or (data.bad_shards=skip) leave those shards out so all ranks plan alike."""
    union = {name: problem for per_rank in gather_object([bad]) for name, problem in per_rank.items()}
    if not union:
        return manifest
    if cfg.bad_shards == "error":
        raise DataError(bad_shards_message(cfg.path, union))
    accelerator.print(
        f"distvit: leaving out {len(union)} bad shard(s) (data.bad_shards=skip): {describe(cfg.path, union)}"
    )
    return without_shards(manifest, set(union), cfg.path)


class DataSources:
    """Training and evaluation batches, the training subset and the epoch plan of this rank."""

    def __init__(
        self,
        cfg: DataConfig,
        train_cfg: TrainConfig,
        manifest: Manifest,
        accelerator: Accelerator,
        img_size: int,
        splits: dict[str, SplitTensors] | None = None,
        repeats: int = 1,
    ):
        """`splits`: in-memory data by split name instead of the shards of cfg.path (benchmarks);
        `repeats`: each sample's appearances per epoch (repeated augmentation)."""
        self.repeats = repeats
        self.batch_size, self.seed = train_cfg.batch_size, train_cfg.seed
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        device = accelerator.device
        self.cache = None
        if cfg.cache_dir and splits is None:
            shards = [shard for name in (cfg.train_split, cfg.eval_split) for shard in manifest.splits[name].shards]
            unique = list({shard.name: shard for shard in shards}.values())
            self.cache = ShardCache(cfg.cache_dir, cfg.remote, cfg.cache_limit, unique, manifest.num_classes)
        workers = loader_workers(cfg.num_workers)
        self.train, self.eval = (
            MemoryBatches(splits[split].to(device))
            if splits is not None
            else open_batches(cfg.path, manifest, split, cfg.mode, workers, device, img_size, self.cache, cfg.decode)
            for split in (cfg.train_split, cfg.eval_split)
        )
        shuffle = cfg.shuffle if cfg.shuffle != "auto" else ("window" if self.cache else "global")
        self.shuffle_window = cfg.shuffle_window if shuffle == "window" else 0
        """Shards per window of the epoch order (0: a global permutation)."""
        self.train_shard_sizes = [shard.num_samples for shard in manifest.splits[cfg.train_split].shards]
        if not len(self.train):
            raise DataError(f"split '{cfg.train_split}' of {cfg.path} has no samples to train on.")
        if cfg.train_subset > len(self.train):
            raise DataError(
                f"data.train_subset={cfg.train_subset} exceeds the {len(self.train)} training images left "
                f"after skipping bad shards; lower it or repair the shards."
            )
        self.train_size = len(self.train)
        """Images in the training split (before any subset)."""
        self.subset = subset_indices(self.train_size, cfg.train_subset, self.seed) if cfg.train_subset else None
        self.num_train = len(self.subset) if self.subset is not None else self.train_size
        self.steps_per_epoch = num_steps(self.num_train * repeats, self.batch_size)
        self.feature_seconds: float | None = None
        """Time spent computing cached backbone features (head-only runs), None when not cached."""

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's samples in order; with repeats, each sample's copies next to each other (so they
        share a global batch, as DeiT's repeated-augmentation sampler puts them), each augmented anew
        because a sample's augmentation follows its slot."""
        if self.shuffle_window:
            order = window_order(self.train_shard_sizes, self.seed, epoch, self.shuffle_window)
            order = order[torch.isin(order, self.subset)] if self.subset is not None else order
        else:
            order = epoch_order(self.num_train, self.seed, epoch)
            order = self.subset[order] if self.subset is not None else order
        return order.repeat_interleave(self.repeats) if self.repeats > 1 else order

    def cache_stats(self) -> dict | None:
        """This node's shard-cache counts (limit, peak bytes, fetched, evicted, reused), when streaming
        through data.cache_dir."""
        return self.cache.stats() if self.cache is not None else None

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def epoch_plan(self, epoch: int, start_sample: int = 0) -> tuple[EpochPlan, slice]:
        """This rank's plan of `epoch` from `start_sample` on, and its slice of each global batch."""
        plan = EpochPlan(self.epoch_order(epoch), self.batch_size, self.world, self.rank, start_sample=start_sample)
        return plan, slice(self.rank * plan.local_batch, (self.rank + 1) * plan.local_batch)

    def endless_batches(self) -> Iterator[tuple[RankBatch, torch.Tensor, torch.Tensor, slice, int, int]]:
        """This rank's training batches epoch after epoch as training plans them (benchmarks): (batch,
        images, labels, this rank's slice, global batch, epoch)."""
        epoch = 0
        while True:
            plan, local = self.epoch_plan(epoch)
            for batch, images, labels in self.train.epoch(plan):
                yield batch, images, labels, local, plan.global_batch, epoch
            epoch += 1

    def use_features(
        self, model: torch.nn.Module, transform: BatchTransform, global_batch: int, accelerator: Accelerator
    ) -> None:
        """Replace the training images by the frozen backbone's features (see distvit.engine.features)."""
        start = time.perf_counter()
        indices = self.subset if self.subset is not None else sequential_order(self.train_size)
        self.train = MemoryBatches(compute_features(model, self.train, indices, transform, global_batch, accelerator))
        self.feature_seconds = time.perf_counter() - start
