"""Decoded batches from loader workers to the training process through a fixed ring of shared-memory slots.

torch's DataLoader hands each worker batch over in a fresh shared-memory segment, whose pages are
created, zeroed and faulted in for every batch: at 224 px that costs a worker ~0.75 ms per MB, 112 us
per image against 290 us to decode its JPEG (measured, 2 vCPUs). Slots allocated once cost that once.

Batch `step` of a pass goes to slot `step % slots`. A worker writes it only once the consumer is done
with the batch that slot held before (`released`, a shared counter the training process advances when
the loop asks for the next batch), so a slot is never overwritten while in use; with more slots than
batches the loader keeps in flight, no worker ever waits. The training process reads the slot in place.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from distvit.errors import DataError

SHARED_MEMORY = "/dev/shm"


class StepIndices(list):
    """A batch's sample indices and its step in the pass (its slot), as one item of the index queue."""

    def __init__(self, indices: list[int], step: int):
        super().__init__(indices)
        self.step = step


class StepSamples(list):
    """The samples fetched for a `StepIndices`, and its step (what the collate function receives)."""

    def __init__(self, samples: list, step: int | None):
        super().__init__(samples)
        self.step = step


@dataclass(frozen=True)
class RingSlot:
    """What a worker sends instead of the images: where they are."""

    step: int
    count: int


class BatchRing:
    def __init__(self, slots: int, batch_size: int, sample_shape: tuple[int, ...], workers: int, ranks: int = 1):
        """`ranks`: the training processes of this node, each with a ring of its own."""
        needed = slots * batch_size * math.prod(sample_shape)
        what = f"the loader's {workers} workers ({slots} batches of {batch_size} images)"
        if ranks > 1:
            what = f"{ranks} ranks' loaders ({workers} workers, {slots} batches of {batch_size} images each)"
        check_shared_memory(needed * ranks, what)
        self.slots = slots
        self.batch_size = batch_size
        try:  # straight into shared memory, as torch's default_collate allocates (no private copy first)
            storage = torch.UntypedStorage._new_shared(needed)
        except RuntimeError as err:  # torch reserves the pages: a full /dev/shm fails here, not with SIGBUS
            raise DataError(f"{what} could not get {needed / 2**20:.0f} MiB of shared memory ({err}). {FIX}") from None
        self.images = torch.empty(0, dtype=torch.uint8).set_(storage).view(slots, batch_size, *sample_shape)
        self.released = torch.zeros(1, dtype=torch.int64).share_memory_()
        """Steps of this pass the consumer is done with (every step below it)."""
        self.owner = os.getpid()
        """The training process: once it is gone, a worker still waiting for a slot ends itself (see `put`)."""

    def fits(self, batch_size: int, sample_shape: tuple[int, ...]) -> bool:
        return batch_size <= self.batch_size and tuple(self.images.shape[2:]) == tuple(sample_shape)

    def begin_pass(self) -> None:
        """Only while no worker of an earlier pass is alive (see `end_pass`)."""
        self.released.fill_(0)

    def end_pass(self) -> None:
        """Let every worker still waiting for a slot go on (the pass ended early; its batches are unused)."""
        self.released.fill_(2**62)

    def put(self, step: int, images: list[torch.Tensor]) -> RingSlot:
        """In a worker: stack `images` into the slot of `step` once its previous batch is released."""
        waits = 0
        while int(self.released[0]) < step - self.slots + 1:
            time.sleep(0.0005)
            waits += 1
            # Nothing releases a slot once the training process is gone (where the kernel does not end its
            # workers with it: see distvit.data.read.loader.WorkerStart): a worker still waiting ends itself.
            if waits % 1000 == 0 and os.getpid() != self.owner and not _alive(self.owner):
                os._exit(0)
        torch.stack(images, out=self.images[step % self.slots, : len(images)])
        return RingSlot(step, len(images))

    def take(self, slot: RingSlot) -> torch.Tensor:
        """The images of `slot`, in place: valid until `release(slot.step)`."""
        return self.images[slot.step % self.slots, : slot.count]

    def release(self, step: int) -> None:
        self.released[0] = step + 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid: ours is gone
        return False
    return True


FIX = (
    "Lower data.num_workers or train.batch_size, or give the machine more shared memory "
    "(in a container: docker run --shm-size=...)."
)


def check_shared_memory(needed: int, what: str) -> None:
    """One clear error where /dev/shm cannot hold `needed` bytes at all (a container's default is 64 MB).
    Against its size, not what is free: every rank of a node then reaches the same verdict, whichever
    allocated first."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:  # not Linux, or no /dev/shm: torch shares memory another way
        return
    size = stats.f_blocks * stats.f_frsize
    if needed > size:
        raise DataError(
            f"{what} need {needed / 2**20:.0f} MiB of shared memory; {SHARED_MEMORY} holds "
            f"{size / 2**20:.0f} MiB in all. {FIX}"
        )
