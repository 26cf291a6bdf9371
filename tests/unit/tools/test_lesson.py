"""distvit.tools.lesson: the baseline's loader (refused where /dev/shm cannot hold its batch), its
per-item preprocessing (the same numbers as distvit's BatchTransform), and its loop's loss and phases."""

from __future__ import annotations

import collections

import pytest
import torch

from distvit.augment.transforms import BatchTransform
from distvit.data.read.memory import SplitTensors
from distvit.engine.timing import PhaseTimer
from distvit.errors import DataError
from distvit.tools import lesson
from distvit.tools.lesson import IMAGENET_MEAN, IMAGENET_STD, LessonCIFAR, LessonLoop, check_shm_room, lesson_loader

Usage = collections.namedtuple("Usage", "total used free")


def _shm_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(lesson.shutil, "disk_usage", lambda path: Usage(free, 0, free))


def test_a_roomy_dev_shm_keeps_the_batch(monkeypatch):
    _shm_free(monkeypatch, 64 * 2**30)
    loader = lesson_loader(_data(), 224, 256)
    assert loader.batch_size == 256


def test_a_small_dev_shm_is_refused_not_a_smaller_lesson_batch(monkeypatch):
    """A smaller batch would slow the lesson on a GPU and inflate distvit's ratio: refuse, say how much."""
    _shm_free(monkeypatch, 64 * 2**20)
    # 5 batches in flight (2 workers x 2 prefetched + 1) of 224 px float32 images (602,112 bytes each) must
    # fit in 80 % of 64 MiB (53.7 MB): 17 x 5 x 602,112 = 51.2 MB does, 18 do not
    check_shm_room(17, 224)
    with pytest.raises(DataError, match=r"^/dev/shm has 64 MB free, .* needs about 65 MB for batches of 18 images"):
        check_shm_room(18, 224)
    with pytest.raises(DataError, match=r"needs about 919 MB for batches of 256 images at 224 px\. .*--shm-size"):
        lesson_loader(_data(), 224, 256)
    check_shm_room(89, 224, workers=0)  # 1 batch in flight: 89 x 602,112 = 53.6 MB
    assert lesson_loader(_data(), 224, 256, workers=0).batch_size == 256  # no workers: nothing in /dev/shm


def test_without_dev_shm_the_batch_is_kept(monkeypatch):
    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(lesson.shutil, "disk_usage", missing)
    check_shm_room(512, 224)


def _data(n: int = 10, size: int = 8) -> SplitTensors:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
    return SplitTensors(images, torch.arange(n) % 3)


def test_items_are_normalised_like_distvits_transform():
    from torchvision import transforms

    data = _data()
    dataset = LessonCIFAR(
        data, transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    )
    assert len(dataset) == 10
    image, label = dataset[7]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1
    ours = BatchTransform((8, 8), IMAGENET_MEAN, IMAGENET_STD)(data.images[7:8])[0]
    torch.testing.assert_close(image, ours, rtol=0, atol=1e-6)
    pixel = data.images[7, 2, 5, 1].item()  # row 2, column 5, green
    assert image[1, 2, 5].item() == pytest.approx((pixel / 255 - 0.456) / 0.224, abs=1e-6)


def test_loader_batches_resizes_and_drops_the_last_partial_batch():
    loader = lesson_loader(_data(), 16, 4, workers=0)
    batches = list(loader)
    assert len(batches) == 2  # 10 images in batches of 4: the last 2 are dropped
    images, labels = batches[0]
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4,)
    same_size = next(iter(lesson_loader(_data(), 8, 10, workers=0)))
    assert sorted(same_size[1].tolist()) == sorted((torch.arange(10) % 3).tolist())  # every image, shuffled


def test_the_loop_reports_the_running_loss_and_its_phases():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3), torch.nn.Linear(3, 3))
    model[2].requires_grad_(False)
    data = _data()
    loader = lesson_loader(data, 8, 10, workers=0)  # one batch of the whole split: its loss ignores the order
    normalised = BatchTransform((8, 8), IMAGENET_MEAN, IMAGENET_STD)(data.images)
    with torch.no_grad():
        first_loss = torch.nn.functional.cross_entropy(model(normalised), data.labels).item()
    frozen = model[2].weight.clone()
    loop = LessonLoop(model, loader, torch.device("cpu"), lr=0.1)
    timer = PhaseTimer(torch.device("cpu"))
    running = loop.step(timer)
    assert running == pytest.approx(first_loss, rel=1e-5)
    with torch.no_grad():
        second_loss = torch.nn.functional.cross_entropy(model(normalised), data.labels).item()
    assert second_loss < first_loss  # SGD moved the trainable layer downhill
    assert loop.step() == pytest.approx(first_loss + second_loss, rel=1e-5)  # the running sum, as printed
    assert list(timer.seconds()) == ["data", "forward_backward", "optimizer"]
    assert torch.equal(model[2].weight, frozen)
    assert [id(p) for group in loop.optimizer.param_groups for p in group["params"]] == [
        id(model[1].weight),
        id(model[1].bias),
    ]
