"""Batches for a rank, following the epoch plan, from memory or streamed from the shards.

Both sources yield `(RankBatch, images, labels)` with uint8 N x H x W x C images on the training device,
for exactly the slots of the plan, so the exactly-once and equal-steps guarantees of `plan.py` hold for
both, for any number of loader workers.

- `MemoryBatches`: the whole split decoded once into a tensor (on the GPU when there is one).
- `StreamBatches`: random access into local tar shards through an index of member offsets built from the
  tar headers; decoding runs in DataLoader worker processes, `num_workers` batches ahead of the loop.
  Order is preserved: a DataLoader over a batch sampler returns batches in sampler order. With a
  `ShardCache` the shards are fetched from data.remote as the plan needs them (distvit.data.read.cache): each
  pass publishes its needs, each batch its progress.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distvit.data.devices import to_device
from distvit.data.images import checked_jpeg, decode_jpeg, decode_stored, resize_and_crop, undecodable
from distvit.data.manifest import Manifest, ShardInfo, sample_location
from distvit.data.node import local_ranks, usable_cores
from distvit.data.plan import EpochPlan, RankBatch
from distvit.data.read.cache import CacheReader, ShardCache
from distvit.data.read.memory import SplitTensors, check_shard_files
from distvit.data.read.ring import BatchRing, RingSlot, StepIndices, StepSamples
from distvit.data.read.shared_split import host_budget, load_split_once_per_node, placement, split_bytes
from distvit.data.tarindex import SampleLocation, index_shard
from distvit.errors import DataError

Batch = tuple[RankBatch, torch.Tensor, torch.Tensor]
PREFETCH_FACTOR = 4
"""Batches each loader worker reads ahead of the training loop."""


class MemoryBatches:
    def __init__(self, data: SplitTensors):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def epoch(self, plan: EpochPlan, on_failure: Callable[[str], None] | None = None) -> Iterator[Batch]:
        """The plan's batches (every sample was read and checked when the split was loaded: `on_failure`
        is never called)."""
        device = self.data.images.device
        for batch in plan.batches():
            indices = to_device(batch.indices, device)
            yield batch, self.data.images[indices], self.data.labels[indices]


def index_shards(
    dataset_dir: str | os.PathLike, manifest: Manifest, split_name: str
) -> tuple[list[Path], list[SampleLocation]]:
    """Where each sample of the split lies: tar headers give member offsets (no data is read but labels)."""
    split = manifest.split(split_name, dataset_dir)
    paths = check_shard_files(dataset_dir, split)
    locations: list[SampleLocation] = []
    for shard_index, (path, info) in enumerate(zip(paths, split.shards)):
        locations += index_shard(path, manifest.num_classes, info.num_samples, shard_index)
    return paths, locations


class ShardSamples(torch.utils.data.Dataset):
    """Map-style view of a split's shards: item i is (uint8 H x W x C tensor, label) of sample i."""

    def __init__(
        self,
        paths: list[Path],
        locations: list[SampleLocation],
        resize_to: int | None,
        stored_size: tuple[int, int] | None = None,
    ):
        self.paths = paths
        self.keys = [loc.key for loc in locations]
        self.stored_size = stored_size  # the manifest's image size, checked before decoding
        self.shards = np.array([loc.shard for loc in locations], dtype=np.int32)
        self.offsets = np.array([loc.image_offset for loc in locations], dtype=np.int64)
        self.sizes = np.array([loc.image_size for loc in locations], dtype=np.int64)
        self.labels = torch.tensor([loc.label for loc in locations], dtype=torch.int64)
        self.resize_to = resize_to
        self._handles: dict[int, object] = {}  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        shard = int(self.shards[index])
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.paths[shard], "rb")
        handle.seek(int(self.offsets[index]))
        return handle.read(int(self.sizes[index]))

    def __getitems__(self, indices: list[int]) -> StepSamples:
        """A batch's items, with its step when the loader passes one (see distvit.data.read.ring)."""
        return StepSamples([self[i] for i in indices], getattr(indices, "step", None))

    def location(self, index: int) -> str:
        """Sample `index` of the split, for messages."""
        return sample_location(self.paths[int(self.shards[index])], self.keys[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | "SampleFailure":
        return self._decoded(lambda: self.read(index), self.location(index), int(self.labels[index]))

    raw_jpeg = False
    """Items are the JPEG bytes (header checked) for decoding in batches on the training device."""

    def _decoded(self, read: Callable[[], bytes], where: str, label: int) -> tuple[torch.Tensor, int] | "SampleFailure":
        try:
            if self.raw_jpeg:
                return torch.from_numpy(np.frombuffer(checked_jpeg(read(), self.stored_size, where), np.uint8)), label
            array = decode_stored(read(), 3, self.stored_size, where)
        except DataError as err:  # handed to the main process as data, not raised in the worker (see epoch)
            return SampleFailure(str(err), self.sample_shape, self.raw_jpeg)
        if self.resize_to and array.shape[:2] != (self.resize_to, self.resize_to):
            array = resize_and_crop(array, self.resize_to)
        return torch.from_numpy(array), label  # strided is fine: the collate's stack copies it once

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """H x W x C of every item (the stored size, or the size items are brought to)."""
        height, width = self.stored_size if self.resize_to is None else (self.resize_to, self.resize_to)
        return height, width, 3

    def __getstate__(self):  # file handles do not travel to worker processes
        return {**self.__dict__, "_handles": {}}


class CachedShardSamples(ShardSamples):
    """The same items, from shards that reach a node-local cache only when the plan needs them
    (distvit.data.read.cache): a shard's sample index comes with it; sample i of the split is sample
    i - first(shard) of its shard, in the manifest's order of shards and counts."""

    def __init__(
        self,
        reader: CacheReader,
        shards: list[ShardInfo],
        resize_to: int | None,
        stored_size: tuple[int, int] | None = None,
    ):
        self.reader = reader
        self.names = [shard.name for shard in shards]
        self.starts = np.concatenate([[0], np.cumsum([shard.num_samples for shard in shards])]).astype(np.int64)
        self.resize_to, self.stored_size = resize_to, stored_size

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, indices, side="right") - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | "SampleFailure":
        shard = int(self.shard_of(np.int64(index)))
        name = self.names[shard]
        try:
            key, offset, size, _, label = self.reader.index(name)[index - int(self.starts[shard])]
        except DataError as err:  # the fetcher failed (its message) or never delivered
            return SampleFailure(str(err), self.sample_shape)
        return self._decoded(lambda: self.reader.read(name, offset, size), sample_location(name, key), label)

    def location(self, index: int) -> str:
        """Sample `index` of the split, for messages (its key is known only once its shard is indexed)."""
        return sample_location(self.names[int(self.shard_of(np.int64(index)))], index=index)

    def needs(self, batches: list[RankBatch]) -> dict[str, tuple[int, int]]:
        """Shard name -> (first, last) step of `batches` that reads from it (padding slots read sample 0)."""
        spans: dict[str, tuple[int, int]] = {}
        for step, batch in enumerate(batches):
            for shard in np.unique(self.shard_of(batch.indices.numpy())):
                name = self.names[int(shard)]
                spans[name] = (spans[name][0] if name in spans else step, step)
        return spans


@dataclass(frozen=True)
class SampleFailure:
    """A sample a worker could not read: its one-line message. A DataError raised in a DataLoader worker
    reaches the main process wrapped in the worker's traceback; this travels as data instead."""

    message: str
    shape: tuple[int, int, int]
    """The H x W x C a readable sample would have had (its stand-in is black of that shape)."""
    raw_jpeg: bool = False


@dataclass(frozen=True)
class Collate:
    """Samples -> images, labels and the first failed sample's message (None: all read). Images are
    stacked (into the `ring` slot of the batch's step where there is one; a list of JPEG byte tensors for
    device decoding). A failed sample is black with label 0, so that a rank that goes on until all ranks
    can stop together has a batch to step on."""

    ring: BatchRing | None = None

    def __call__(self, samples: list) -> tuple[torch.Tensor | list[torch.Tensor] | RingSlot, torch.Tensor, str | None]:
        failed = next((s for s in samples if isinstance(s, SampleFailure)), None)
        images = [_stand_in(s) if isinstance(s, SampleFailure) else s[0] for s in samples]
        labels = torch.tensor([0 if isinstance(s, SampleFailure) else s[1] for s in samples], dtype=torch.int64)
        message = failed and failed.message
        if images[0].dim() == 1:  # JPEG bytes (stand-ins included) for decoding on the device
            return images, labels, message
        step = getattr(samples, "step", None)
        if self.ring is not None and step is not None:
            return self.ring.put(step, images), labels, message
        # torch's default collate stacks straight into shared memory in a worker: no copy on the way over
        return torch.utils.data.default_collate(images), labels, message


def _stand_in(failure: SampleFailure) -> torch.Tensor:
    if not failure.raw_jpeg:
        return torch.zeros(failure.shape, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.new("RGB", (failure.shape[1], failure.shape[0])).save(buffer, format="JPEG")
    return torch.from_numpy(np.frombuffer(buffer.getvalue(), np.uint8).copy())


def decode_jpeg_batch(payloads: list[torch.Tensor], device: torch.device, where: Callable[[int], str]) -> torch.Tensor:
    """JPEG byte tensors -> uint8 N x H x W x 3 on `device`, decoded there in one call (nvJPEG on a GPU,
    libjpeg-turbo on a CPU). A damaged one is a DataError naming it (`where(i)`)."""
    try:
        decoded = decode_jpeg(payloads, device=device)
    except RuntimeError:
        for i, payload in enumerate(payloads):  # which one: decode them one by one
            try:
                decode_jpeg(payload)
            except RuntimeError as err:
                raise undecodable(where(i), err) from None
        raise
    return torch.stack(decoded).permute(0, 2, 3, 1)  # N x H x W x C, as the other readers give


class StreamBatches:
    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        manifest: Manifest,
        split: str,
        num_workers: int,
        device: torch.device,
        resize_to: int | None = None,
        cache: ShardCache | None = None,
        decode: str = "workers",
    ):
        """`decode`: 'workers' (in the loader workers), 'device' (JPEG shards of one size: the workers only
        read, the batch is decoded on `device`), 'auto' (device on a GPU where that applies)."""
        # Images of varying stored size cannot be stacked: bring each to the model's size in the worker.
        resize = resize_to if manifest.image_size is None else None
        self.cache = cache
        if cache is not None:
            shards = manifest.split(split, dataset_dir).shards
            self.samples = CachedShardSamples(cache.reader, shards, resize, manifest.image_size)
        else:
            paths, locations = index_shards(dataset_dir, manifest, split)
            self.samples = ShardSamples(paths, locations, resize, manifest.image_size)
        self.num_workers = num_workers
        self.device = device
        self.samples.raw_jpeg = device_decoding(decode, manifest, device, split, dataset_dir)
        self.ring: BatchRing | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def where(self, index: int) -> str:
        """The shard and key of sample `index`, for messages."""
        return self.samples.location(index)

    def epoch(self, plan: EpochPlan, on_failure: Callable[[str], None] | None = None) -> Iterator[Batch]:
        """The plan's batches. A sample that cannot be read raises its DataError, or with `on_failure` is
        reported to it and replaced by zeros (several ranks: see distvit.engine.failures).

        A batch's images are valid until the next batch is asked for: with loader workers on a CPU they
        are a slot of the shared ring, which a worker refills then (a copy per batch would cost the
        training process as much as the fresh pages the ring saves). Keep one with `.clone()`.

        A loader worker that dies (the OOM killer, a crash in a decoder) is a DataError naming it, the
        shards it was reading and the likely cause; with `on_failure` it is reported there and the rest
        of the pass is zeros, as for a damaged sample."""
        batches = list(plan.batches())
        ring = self._ring(plan.local_batch)
        loader = torch.utils.data.DataLoader(
            self.samples,
            batch_sampler=[StepIndices(batch.indices.tolist(), step) for step, batch in enumerate(batches)],
            num_workers=self.num_workers,
            collate_fn=Collate(ring),
            pin_memory=self.device.type == "cuda",
            prefetch_factor=PREFETCH_FACTOR if self.num_workers else None,
            worker_init_fn=WorkerStart(os.getpid(), threading.current_thread() is threading.main_thread()),
        )
        reporter = self.cache.reporter if self.cache is not None else None
        if reporter is not None:
            reporter.begin(self.samples.needs(batches), lookahead=PREFETCH_FACTOR * self.num_workers)
        if ring is not None:
            ring.begin_pass()
        previous = _sigchld_handler()
        iterator = iter(loader)
        _restore_sigchld(previous)
        lost: str | None = None  # a dead worker's message: the rest of the pass is stand-ins
        try:
            for step, batch in enumerate(batches):
                if lost is None:
                    try:
                        images, labels, failure = next(iterator)
                    except RuntimeError as err:
                        lost = self._lost_worker(iterator, batches, step, err)
                        if on_failure is None:
                            raise DataError(lost) from None
                        on_failure(lost)
                        _stop_workers(iterator, ring)
                if lost is not None:
                    yield batch, *self._stand_in(batch)
                    continue
                if reporter is not None:
                    self.cache.check()
                    reporter.progress(step + 1)  # this batch is read: its shards may go unless needed later
                if failure is not None:
                    if on_failure is None:
                        raise DataError(failure)
                    on_failure(failure)
                if isinstance(images, list):
                    indices = batch.indices.tolist()
                    images = decode_jpeg_batch(images, self.device, lambda i: self.where(indices[i]))
                elif isinstance(images, RingSlot):
                    images = ring.take(images)
                yield batch, images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                if ring is not None:
                    ring.release(step)  # the loop asks for the next batch: it is done with this one
        finally:
            if ring is not None or lost is not None:
                # The next pass restarts the ring's count: no worker of this one may still write into it.
                # torch stops them when the iterator is collected; this pass may end before then.
                _stop_workers(iterator, ring)

    def _lost_worker(self, iterator, batches: list[RankBatch], step: int, err: RuntimeError) -> str:
        """The message for a loader worker that died (`err` is torch's "exited unexpectedly"); `err`
        itself where no worker died."""
        workers = getattr(iterator, "_workers", [])
        dead = [(index, worker) for index, worker in enumerate(workers) if not worker.is_alive()]
        if not dead or "DataLoader worker" not in str(err):
            raise err
        index, worker = dead[0]
        # The batch it had been given and not delivered (workers take theirs in order): the first of its
        # open tasks, else the one the loop waits for.
        tasks = getattr(iterator, "_task_info", {})
        open_tasks = sorted(task for task, info in tasks.items() if len(info) == 1 and info[0] == index)
        reading = open_tasks[0] if open_tasks and open_tasks[0] < len(batches) else step
        batch = batches[reading]
        indices = batch.indices[batch.valid] if bool(batch.valid.any()) else batch.indices
        return (
            f"loader worker {index} (pid {worker.pid}) {_ended(worker.exitcode)} while reading "
            f"{', '.join(self.shards_of(indices.tolist()))} (batch {reading + 1} of {len(batches)} of this pass, "
            f"from {self.where(int(indices[0]))}). {_likely_cause(worker.exitcode, self.num_workers)}"
        )

    def shards_of(self, indices: list[int]) -> list[str]:
        """The shards that hold the samples `indices`, in order of first appearance, for messages."""
        samples = self.samples
        if isinstance(samples, CachedShardSamples):
            names = [samples.names[int(shard)] for shard in samples.shard_of(np.array(indices, dtype=np.int64))]
        else:
            names = [str(samples.paths[int(samples.shards[index])]) for index in indices]
        return list(dict.fromkeys(names))

    def _stand_in(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros for a batch a dead worker cannot deliver: the rank keeps stepping with the others until
        they all stop on the failure together (distvit.engine.failures)."""
        count = len(batch.indices)
        images = torch.zeros((count, *self.samples.sample_shape), dtype=torch.uint8, device=self.device)
        return images, torch.zeros(count, dtype=torch.int64, device=self.device)

    def _ring(self, batch_size: int) -> BatchRing | None:
        """Shared slots for decoded batches (see distvit.data.read.ring): with loader workers, on a CPU device.
        On a GPU torch's pinned hand-off stays (the copy to the device needs page-locked memory)."""
        if not self.num_workers or self.samples.raw_jpeg or self.device.type != "cpu":
            return None
        shape = self.samples.sample_shape
        if self.ring is None or not self.ring.fits(batch_size, shape):
            self.ring = None  # the old slots go before the new ones are counted against /dev/shm
            slots = PREFETCH_FACTOR * self.num_workers + 2
            self.ring = BatchRing(slots, batch_size, shape, self.num_workers, local_ranks()[1])
        return self.ring


@dataclass(frozen=True)
class WorkerStart:
    """Each loader worker's `worker_init_fn`: stop signals are its rank's business, and it dies with its rank.

    The torchrun agent, Slurm and a terminal's Ctrl-C signal a rank's whole process group, workers
    included: a worker that died of SIGTERM took the rank down with a RuntimeError before it could
    checkpoint. So workers ignore SIGTERM, SIGINT and SIGUSR1 (the rank shuts them down when it stops),
    and the kernel SIGKILLs them when the rank dies (a worker waiting for a ring slot would otherwise wait
    forever; torch's own watchdog looks only between batches)."""

    parent: int
    """The rank's pid."""
    main_thread: bool = True
    """Started by the rank's main thread (the kernel's death signal follows the thread, not the process)."""

    def __call__(self, worker_id: int) -> None:
        for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        if self.main_thread:
            die_with_parent(self.parent)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Linux, a forked worker: the kernel SIGKILLs it when the thread that started it ends (the rank's main
    thread: the loader is iterated there). A worker started another way (spawn, forkserver: its parent is
    not the rank) or elsewhere keeps torch's watchdog and the ring's own check."""
    if not sys.platform.startswith("linux") or os.getppid() != parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl in this libc: the other checks remain
        return
    if os.getppid() != parent:  # the rank died just before: nothing will ask this worker for anything
        os._exit(0)


def _sigchld_handler() -> object:
    """The SIGCHLD handler before torch's loader installs its own (None where there is none to keep)."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return None
    handler = signal.getsignal(signal.SIGCHLD)
    if getattr(handler, "__module__", "") == "torch.utils.data._utils.signal_handling":
        return signal.SIG_DFL  # torch's, from an earlier loader in this process
    return handler


def _restore_sigchld(previous: object) -> None:
    """torch's SIGCHLD handler raises a dead worker's RuntimeError wherever the rank happens to be (in the
    backward pass, in a collective), where nothing can name the worker or let the other ranks stop with
    it. Without it the loader raises at the batch it waits for (torch checks its workers every 5 s while
    waiting), where `StreamBatches.epoch` turns it into its message."""
    if previous is not None:
        signal.signal(signal.SIGCHLD, previous)


def _stop_workers(iterator, ring: BatchRing | None) -> None:
    if ring is not None:
        ring.end_pass()  # first: a worker waiting for a slot could not otherwise see the shutdown
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited (status {exitcode})" if exitcode else "exited"


def _likely_cause(exitcode: int | None, workers: int) -> str:
    lower = f"lower data.num_workers (now {workers}) or train.batch_size"
    if exitcode == -getattr(signal, "SIGKILL", 9):
        return (
            "Most likely the kernel's OOM killer: memory ran out on the node or under the job's limit (dmesg or "
            f"the job's log says so). {lower.capitalize()}, or give the job more memory."
        )
    if exitcode == -getattr(signal, "SIGBUS", 7):
        return (
            "Most likely shared memory (/dev/shm) ran out: give the machine more (docker run --shm-size=...), or "
            f"{lower}."
        )
    if exitcode is not None and exitcode < 0 and -exitcode in (signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE):
        return (
            "A crash in native code, most likely an image decoder on one of those samples: check those shards "
            f"(prepare them again), and if memory is short, {lower}."
        )
    return f"If memory ran out (the OOM killer), {lower}, or give the job more memory."


def device_decoding(decode: str, manifest: Manifest, device: torch.device, split: str, where) -> bool:
    """Whether batches are decoded on the training device (see StreamBatches); a clear error when asked
    for where it cannot apply."""
    jpeg = manifest.source.get("image_format") == "jpeg" and manifest.image_size is not None
    if decode == "auto":
        return jpeg and device.type == "cuda"
    if decode == "device" and not jpeg:
        raise DataError(
            f"data.decode=device needs JPEG shards of one image size; {where} (split {split}) holds "
            f"{manifest.source.get('image_format', 'png')} images{'' if manifest.image_size else ' of varying size'}. "
            "Prepare it with --format jpeg --image-size S, or use data.decode=workers."
        )
    return decode == "device"


def open_batches(
    dataset_dir: str | os.PathLike,
    manifest: Manifest,
    split: str,
    *,
    mode: str,
    num_workers: int,
    device: torch.device,
    resize_to: int,
    cache: ShardCache | None = None,
    decode: str = "workers",
) -> MemoryBatches | StreamBatches:
    """`mode`: 'memory', 'stream', or 'auto' (memory when the decoded split fits: `fits_in_memory`, and
    the node's first rank agrees, see distvit.data.read.shared_split); with a `cache`, always streamed through it."""
    if cache is None and mode in ("memory", "auto"):
        fits = None if mode == "memory" else _fits_this_rank(manifest, split, device)
        data = load_split_once_per_node(dataset_dir, manifest, split, auto_fits=fits)
        if data is not None:
            return MemoryBatches(data.to(device))
    return StreamBatches(dataset_dir, manifest, split, num_workers, device, resize_to, cache, decode)


def fits_in_memory(manifest: Manifest, split: str, device: torch.device | None = None) -> bool:
    """data.mode=auto: the decoded split fits in a third of the host's available memory, on a GPU in a
    quarter of its memory (each rank holds it there beside the model), and with several ranks on the
    node where they would hold it: the node's shared memory (/dev/shm: size and free space), or one
    private copy each within that third (distvit.data.read.shared_split.placement)."""
    ranks = local_ranks()[1]
    fits = _fits_this_rank(manifest, split, device)
    return fits and (ranks == 1 or placement(manifest, split, ranks, auto=True)[0] != "stream")


def _fits_this_rank(manifest: Manifest, split: str, device: torch.device | None) -> bool:
    """The host's third and this rank's GPU; where the node's ranks hold it is the first rank's decision
    (distvit.data.read.shared_split), with its note."""
    if manifest.image_size is None:
        return False
    decoded = split_bytes(manifest, split)
    if decoded > host_budget():
        return False
    if device is not None and device.type == "cuda":
        return decoded <= torch.cuda.get_device_properties(device).total_memory // 4
    return True


def loader_workers(configured: int | None) -> int:
    """data.num_workers, or when unset what the node's cores allow: its usable cores shared by its ranks,
    one left for each training process, at most 8 per rank."""
    if configured is not None:
        return configured
    return max(1, min(8, usable_cores() // local_ranks()[1] - 1))
