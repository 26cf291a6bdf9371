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
from distvit.data.fetch import FetchPolicy
from distvit.data.loader import MemoryBatches, loader_workers, open_batches
from distvit.data.manifest import Manifest
from distvit.data.memory import SplitTensors
from distvit.data.plan import EpochPlan, RankBatch, sequential_order
from distvit.data.preflight import bad_shards_message, describe, without_shards
from distvit.data.transforms import BatchTransform
from distvit.engine.features import compute_features
from distvit.engine.order import EpochOrders, OrderSettings, ResumePoint
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
        order: OrderSettings,
        splits: dict[str, SplitTensors] | None = None,
        resumed: ResumePoint | None = None,
    ):
        """`order`: what the epoch orders depend on (distvit.engine.order); `splits`: in-memory data by split
        name instead of the shards of cfg.path (benchmarks); `resumed`: where a resumed run continues."""
        self.batch_size = train_cfg.batch_size
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        device = accelerator.device
        self.cache = None
        if cfg.cache_dir and splits is None:
            shards = [shard for name in (cfg.train_split, cfg.eval_split) for shard in manifest.splits[name].shards]
            unique = list({shard.name: shard for shard in shards}.values())
            policy = FetchPolicy.of(cfg)  # data.fetch_timeout_s, fetch_stall_s, fetch_retries
            self.cache = ShardCache(cfg.cache_dir, cfg.remote, cfg.cache_limit, unique, manifest.num_classes, policy)
        workers = loader_workers(cfg.num_workers)
        self.train, self.eval = (
            MemoryBatches(splits[split].to(device))
            if splits is not None
            else open_batches(cfg.path, manifest, split, cfg.mode, workers, device, img_size, self.cache, cfg.decode)
            for split in (cfg.train_split, cfg.eval_split)
        )
        if not len(self.train):
            raise DataError(f"split '{cfg.train_split}' of {cfg.path} has no samples to train on.")
        if cfg.train_subset > len(self.train):
            raise DataError(
                f"data.train_subset={cfg.train_subset} exceeds the {len(self.train)} training images left "
                f"after skipping bad shards; lower it or repair the shards."
            )
        shard_sizes = [shard.num_samples for shard in manifest.splits[cfg.train_split].shards]
        self.orders = EpochOrders(order, shard_sizes, len(self.train), self.batch_size, self.world, self.rank)
        resumed = resumed or ResumePoint()
        if resumed.kept is not None:
            self.orders.keep(resumed.epoch, resumed.kept)
        if self.cache is not None:  # what every pass left needs at once, on every rank before the first step
            self.cache.check_passes(
                self, train_cfg.epochs, train_cfg.eval_batch_size, gather_object, resumed.epoch, resumed.samples
            )
        self.train_size = len(self.train)
        """Images in the training split (before any subset)."""
        self.subset = self.orders.subset
        self.num_train = self.orders.num_train
        self.feature_seconds: float | None = None
        """Time spent computing cached backbone features (head-only runs), None when not cached."""

    @property
    def steps_per_epoch(self) -> int:
        """Steps of an epoch with the run's own order settings (the schedule is planned in them)."""
        return self.orders.steps_per_epoch

    @property
    def shuffle_window(self) -> int:
        """Shards per window of the epoch order (0: a global permutation)."""
        return self.orders.settings.shuffle_window

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's samples in order (see distvit.engine.order.EpochOrders.order)."""
        return self.orders.order(epoch)

    def cache_stats(self) -> dict | None:
        """This node's shard-cache counts (limit, peak bytes, fetched, evicted, reused), when streaming
        through data.cache_dir."""
        return self.cache.stats() if self.cache is not None else None

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def epoch_plan(self, epoch: int, start_sample: int = 0) -> tuple[EpochPlan, slice]:
        """This rank's plan of `epoch` from `start_sample` on, and its slice of each global batch."""
        return self.orders.plan(epoch, start_sample)

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
