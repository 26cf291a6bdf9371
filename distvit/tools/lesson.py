"""The lesson's training loop, kept as the baseline distvit's benchmarks divide by.

What the course lesson (and most tutorials) do: a torchvision-style CIFAR-10 dataset that turns each
uint8 array into a PIL image, PIL `Resize` to the model's input size, `ToTensor` and `Normalize`, in a
`DataLoader` with 2 workers; the model in fp32, eager; SGD with momentum; `loss.item()` every step.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import torch
from PIL import Image

from distvit.data.read.memory import SplitTensors
from distvit.engine.timing import PhaseTimer
from distvit.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LESSON_WORKERS = 2


class LessonCIFAR(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, data: SplitTensors, transform):
        self.images = data.images.cpu().numpy()
        self.labels = data.labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def check_shm_room(batch_size: int, img_size: int, workers: int = LESSON_WORKERS) -> None:
    """Refuse a lesson baseline that /dev/shm cannot hold: each batch in flight (workers x 2 prefetched,
    plus the one in use) sits there as float32, and containers often have only 64 MB. Running the lesson
    at a smaller batch instead would slow it on a GPU and flatter every ratio against it."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return  # no /dev/shm: the workers share memory some other way
    needed = (2 * workers + 1) * batch_size * 3 * img_size * img_size * 4
    if needed > 0.8 * free:
        raise DataError(
            f"/dev/shm has {free / 2**20:.0f} MB free, and the lesson's DataLoader ({workers} workers) needs about "
            f"{needed / 0.8 / 2**20:.0f} MB for batches of {batch_size} images at {img_size} px. Give the machine "
            "more shared memory (docker run --shm-size=4g; a Slurm or Kubernetes job's /dev/shm size), or "
            "benchmark both loops at a smaller train.batch_size."
        )


def lesson_loader(
    data: SplitTensors,
    img_size: int,
    batch_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    workers: int = LESSON_WORKERS,
) -> torch.utils.data.DataLoader:
    """The lesson's DataLoader, at the batch asked for (refused where /dev/shm cannot hold it)."""
    from torchvision import transforms

    if workers:
        check_shm_room(batch_size, img_size, workers)

    resize = [transforms.Resize(img_size)] if img_size != data.images.shape[1] else []
    transform = transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.utils.data.DataLoader(
        LessonCIFAR(data, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def endless(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader


class LessonLoop:
    """The lesson's training loop, one `step()` at a time."""

    def __init__(
        self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, lr: float = 0.01
    ):
        self.model = model.train()
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.batches = endless(loader)
        self.device = device
        self.running_loss = 0.0

    def step(self, timer: PhaseTimer | None = None) -> float:
        """One step; returns the running loss (read every step, as the lesson prints it)."""
        if timer:
            timer.start()
        images, labels = next(self.batches)
        images, labels = images.to(self.device), labels.to(self.device)
        if timer:
            timer.mark("data")
        self.optimizer.zero_grad()
        loss = self.criterion(self.model(images), labels)
        loss.backward()
        if timer:
            timer.mark("forward_backward")
        self.optimizer.step()
        self.running_loss += loss.item()
        if timer:
            timer.mark("optimizer")
        return self.running_loss
