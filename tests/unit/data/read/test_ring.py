"""The shared ring decoded batches travel through (distvit.data.read.ring): a slot is never refilled while the
loop still uses it, passes that end early leave nothing behind, and too little shared memory is an error."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, epoch_order
from distvit.data.read.loader import MemoryBatches, StreamBatches
from distvit.data.read.memory import load_split
from distvit.data.read.ring import SHARED_MEMORY, BatchRing, RingSlot
from distvit.errors import DataError

CPU = torch.device("cpu")


def test_a_worker_waits_until_the_slot_it_needs_is_released():
    ring = BatchRing(slots=2, batch_size=3, sample_shape=(2, 2, 3), workers=1)
    ring.begin_pass()
    batch = [torch.full((2, 2, 3), value, dtype=torch.uint8) for value in (1, 2, 3)]
    ring.put(0, batch), ring.put(1, batch)  # both slots full
    third = [torch.full((2, 2, 3), 9, dtype=torch.uint8)] * 2
    done = threading.Event()
    writer = threading.Thread(target=lambda: (ring.put(2, third), done.set()))
    writer.start()
    time.sleep(0.3)
    assert not done.is_set()  # step 2 needs slot 0, which step 0 still holds
    assert torch.equal(ring.take(RingSlot(0, 3)), torch.stack(batch))  # untouched while it waits
    ring.release(0)
    assert done.wait(5)
    writer.join()
    slot = ring.take(RingSlot(2, 2))
    assert torch.equal(slot, torch.stack(third)) and slot.data_ptr() == ring.images[0].data_ptr()


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("slots", [None, 2])  # the loader's own ring; one so small that workers must wait
def test_batches_stay_intact_while_the_loop_uses_them_and_after_a_pass_ends_early(small_dataset, slots):
    manifest = read_manifest(small_dataset)
    memory = MemoryBatches(load_split(small_dataset, manifest, "train"))
    stream = StreamBatches(small_dataset, manifest, "train", 3, CPU)
    if slots is not None:
        stream.ring = BatchRing(slots, 8, stream.samples.sample_shape, 3)
    for epoch, stop_after in ((0, 4), (1, None), (2, None)):  # a pass abandoned mid-way, then whole ones
        plan = EpochPlan(epoch_order(len(memory), seed=0, epoch=epoch), 8, 1, 0)
        expected = memory.epoch(plan)
        for step, (batch, images, labels) in enumerate(stream.epoch(plan)):
            time.sleep(0.02)  # the workers fill every slot they may meanwhile
            _, want, want_labels = next(expected)
            assert torch.equal(images, want) and torch.equal(labels, want_labels), (epoch, step)
            if step + 1 == stop_after:
                break
    assert stream.ring is not None and stream.ring.images.is_shared()
    assert stream.ring.slots == (slots or 4 * 3 + 2)


@pytest.mark.skipif(not os.path.isdir(SHARED_MEMORY), reason=f"no {SHARED_MEMORY} here")
def test_too_little_shared_memory_is_one_error_naming_the_fix():
    with pytest.raises(DataError) as err:
        BatchRing(slots=34, batch_size=10**6, sample_shape=(224, 224, 3), workers=8)  # ~5 TB
    message = str(err.value)
    assert message.startswith("the loader's 8 workers (34 batches of 1000000 images) need 4880859 MiB of shared memory")
    assert SHARED_MEMORY in message and "data.num_workers" in message and "--shm-size" in message
    stats = os.statvfs(SHARED_MEMORY)
    half = stats.f_blocks * stats.f_frsize // 2 // (224 * 224 * 3)  # a batch of half of /dev/shm: 4 ranks cannot
    with pytest.raises(DataError, match=r"^4 ranks' loaders \(1 workers, 1 batches of \d+ images each\) need "):
        BatchRing(slots=1, batch_size=half, sample_shape=(224, 224, 3), workers=1, ranks=4)


def test_a_full_shared_memory_at_allocation_is_one_error(monkeypatch):
    def full(nbytes):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", full)
    with pytest.raises(DataError) as err:
        BatchRing(slots=2, batch_size=4, sample_shape=(8, 8, 3), workers=1)
    assert str(err.value).startswith("the loader's 1 workers (2 batches of 4 images) could not get 0 MiB of shared ")
    assert "No space left on device" in str(err.value) and "--shm-size" in str(err.value)
