"""The lesson's training loop, kept as the baseline distvit's benchmarks divide by.

What the course lesson (and most tutorials) do: a torchvision-style CIFAR-10 dataset that turns each
uint8 array into a PIL image, PIL `Resize` to the model's input size, `ToTensor` and `Normalize`, in a
`DataLoader` with 2 workers; the model in fp32, eager; SGD with momentum; `loss.item()` every step.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator

import torch
from PIL import Image

from distvit.data.memory import SplitTensors
from distvit.engine.timing import PhaseTimer

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


def fitting_batch(batch_size: int, img_size: int, workers: int = LESSON_WORKERS) -> int:
    """The batch the loader's workers can hand over: each batch in flight (workers x 2 prefetched, plus the
    one in use) sits in /dev/shm as float32, and containers often have only 64 MB there."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return batch_size
    per_image = 3 * img_size * img_size * 4
    fitting = batch_size
    while fitting > 8 and (2 * workers + 1) * fitting * per_image > 0.8 * free:
        fitting //= 2
    if fitting != batch_size:
        warnings.warn(
            f"/dev/shm has {free / 2**20:.0f} MB free: "
            f"the lesson's DataLoader uses batch {fitting} instead of {batch_size}."
        )
    return fitting


def lesson_loader(
    data: SplitTensors,
    img_size: int,
    batch_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    workers: int = LESSON_WORKERS,
) -> torch.utils.data.DataLoader:
    """The lesson's DataLoader (at a smaller batch where /dev/shm cannot hold the requested one)."""
    from torchvision import transforms

    batch_size = fitting_batch(batch_size, img_size, workers) if workers else batch_size

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
