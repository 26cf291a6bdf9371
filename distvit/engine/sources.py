"""The data a run trains and evaluates on, and the order it takes them in. This module reads the data
section (with distvit.engine.order, which derives the epoch order from it).

The global plan (`distvit.data.plan`) tells each rank which samples to take at each step, and the batch
source (`distvit.data.read.loader`) delivers exactly those, as uint8; so every rank runs the same number
of steps and every sample is seen once per epoch, also across a resume with another world size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from distvit.augment.transforms import BatchTransform
from distvit.config import DataConfig
from distvit.data.manifest import Manifest
from distvit.data.plan import EpochPlan, RankBatch, sequential_order
from distvit.data.read.cache import ShardCache
from distvit.data.read.fetch import FetchPolicy
from distvit.data.read.loader import MemoryBatches, StreamBatches, loader_workers, open_batches
from distvit.data.read.memory import SplitTensors
from distvit.data.read.shard_checks import bad_shards_message, describe, without_shards
from distvit.engine.features import compute_features
from distvit.engine.metrics import SampleTrace
from distvit.engine.order import EpochOrders, OrderSettings, ResumePoint
from distvit.errors import DataError


def fetch_policy(data: DataConfig) -> FetchPolicy:
    """The time limits and tries of every fetch from data.remote (data.fetch_timeout_s, fetch_stall_s,
    fetch_retries)."""
    return recorded_fetch_policy(dataclasses.asdict(data))


def recorded_fetch_policy(data: Mapping) -> FetchPolicy:
    """The same from a data section as a checkpoint recorded it; a run of an earlier distvit recorded no
    fetch limits: the defaults."""
    defaults = FetchPolicy()
    return FetchPolicy(
        float(data.get("fetch_timeout_s", defaults.connect_s)),
        float(data.get("fetch_stall_s", defaults.stall_s)),
        int(data.get("fetch_retries", defaults.retries)),
    )


@dataclass(frozen=True)
class StepInput:
    """One training step's data on this rank, and where it lies in the epoch's global batch (a step's
    augmentation and mixing are drawn for the global batch, then each rank takes its slice)."""

    batch: RankBatch
    images: torch.Tensor
    labels: torch.Tensor
    local: slice
    """This rank's slots of the global batch."""
    global_batch: int
    epoch: int
    """The epoch the step belongs to (0-based)."""


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
        *,
        manifest: Manifest,
        accelerator: Accelerator,
        img_size: int,
        order: OrderSettings,
        global_batch: int,
        splits: dict[str, SplitTensors] | None = None,
        resumed: ResumePoint | None = None,
    ):
        """`order`: what the epoch orders depend on (distvit.engine.order); `global_batch`: train.batch_size;
        `splits`: in-memory data by split name instead of the shards of cfg.path (benchmarks); `resumed`:
        where a resumed run continues."""
        self.cfg = cfg
        self.batch_size = global_batch
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.path, self.eval_split = cfg.path, cfg.eval_split
        device = accelerator.device
        self.cache = None
        if cfg.cache_dir and splits is None:
            shards = [shard for name in (cfg.train_split, cfg.eval_split) for shard in manifest.splits[name].shards]
            unique = list({shard.name: shard for shard in shards}.values())
            policy = fetch_policy(cfg)
            self.cache = ShardCache(cfg.cache_dir, cfg.remote, cfg.cache_limit, unique, manifest.num_classes, policy)
        workers = loader_workers(cfg.num_workers)
        self.train, self.eval = (
            MemoryBatches(splits[split].to(device))
            if splits is not None
            else open_batches(
                cfg.path,
                manifest,
                split,
                mode=cfg.mode,
                num_workers=workers,
                device=device,
                resize_to=img_size,
                cache=self.cache,
                decode=cfg.decode,
            )
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
        self.resumed = resumed or ResumePoint()
        if self.resumed.kept is not None:
            self.orders.keep(self.resumed.epoch, self.resumed.kept)
        self.train_size = len(self.train)
        """Images in the training split (before any subset)."""
        self.subset = self.orders.subset
        self.num_train = self.orders.num_train
        self.feature_seconds: float | None = None
        """Time spent computing cached backbone features (head-only runs), None when not cached."""

    def check_cache(self, epochs: int, eval_batch: int) -> None:
        """Streaming through data.cache_dir: whether the cache holds what every pass left needs at once
        (each epoch up to `epochs`, and the evaluation in batches of `eval_batch`), agreed by all ranks
        before the first step (and before any feature caching reads through the cache)."""
        if self.cache is not None:
            resumed = self.resumed
            self.cache.check_passes(self, epochs, eval_batch, gather_object, resumed.epoch, resumed.samples)

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

    def trace(self, run_dir: Path) -> SampleTrace:
        """The per-rank record of the samples each step trains on (written only with data.trace_samples)."""
        return SampleTrace(run_dir, self.rank, self.cfg.trace_samples)

    def describe(self) -> str:
        """How the training data is ordered and read, for the start line: '; windows of 4 shards shuffled;
        streamed through ...; data in memory' (data.mode=auto and data.decode=auto resolved)."""
        order = f"; windows of {self.shuffle_window} shards shuffled" if self.shuffle_window else ""
        if self.cache is not None:
            order += f"; streamed through {self.cfg.cache_dir} (at most {self.cfg.cache_limit / 1e9:.3g} GB)"
        return order + f"; data {_reading(self.train, self.cfg.decode)}"

    def epoch_plan(self, epoch: int, start_sample: int = 0) -> tuple[EpochPlan, slice]:
        """This rank's plan of `epoch` from `start_sample` on, and its slice of each global batch."""
        return self.orders.plan(epoch, start_sample)

    def epoch_inputs(
        self, epoch: int, plan: EpochPlan, local: slice, on_failure: Callable[[str], None] | None = None
    ) -> Iterator[StepInput]:
        """The steps of `plan` (this rank's plan of `epoch`, see epoch_plan), as training takes them."""
        for batch, images, labels in self.train.epoch(plan, on_failure):
            yield StepInput(batch, images, labels, local, plan.global_batch, epoch)

    def endless_inputs(self) -> Iterator[StepInput]:
        """This rank's training steps epoch after epoch as training plans them (benchmarks)."""
        epoch = 0
        while True:
            plan, local = self.epoch_plan(epoch)
            yield from self.epoch_inputs(epoch, plan, local)
            epoch += 1

    def use_features(
        self, model: torch.nn.Module, transform: BatchTransform, global_batch: int, accelerator: Accelerator
    ) -> None:
        """Replace the training images by the frozen backbone's features (see distvit.engine.features)."""
        start = time.perf_counter()
        indices = self.subset if self.subset is not None else sequential_order(self.train_size)
        self.train = MemoryBatches(compute_features(model, self.train, indices, transform, global_batch, accelerator))
        self.feature_seconds = time.perf_counter() - start


def _reading(train: MemoryBatches | StreamBatches, decode: str) -> str:
    """How training batches are read (data.mode=auto and data.decode=auto resolved)."""
    if isinstance(train, MemoryBatches):
        unused = " (data.decode=device applies to stream mode only)" if decode == "device" else ""
        return f"in memory{unused}"
    if train.samples.raw_jpeg:
        return "streamed from the shards, decoded on the device"
    workers = train.num_workers
    return "streamed from the shards, decoded " + (
        f"by {workers} loader worker(s)" if workers else "in the training process"
    )
