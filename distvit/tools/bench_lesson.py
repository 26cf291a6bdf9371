"""`distvit bench train --baseline lesson`: the lesson's loop (`distvit.tools.lesson`) on the same device,
model (surgery included) and training images as the benchmark's distvit side, and the ratios against it.
It runs after distvit's side has ended, in one process, so its peak memory is its own."""

from __future__ import annotations

import gc
from functools import partial

import torch
from accelerate.utils import set_seed

from distvit.config import Config
from distvit.data.manifest import Manifest
from distvit.data.read.memory import SplitTensors
from distvit.errors import DataError
from distvit.tools.bench_report import Measurement, TrainBench, measurement
from distvit.tools.measure import device_peak_flops
from distvit.tools.profiling import lesson_epoch, lesson_steps, timed


def lesson_images(
    cfg: Config, manifest: Manifest, splits: dict[str, SplitTensors] | None, subset: torch.Tensor | None
) -> SplitTensors:
    """The images distvit's side trained on: the in-memory split, or the stored one decoded (the lesson
    needs them at one size), narrowed to the same subset."""
    if splits is not None:
        data = splits[cfg.data.train_split]
    else:
        from distvit.data.read.memory import load_split

        if manifest.image_size is None:
            raise DataError(
                f"{cfg.data.path}: the lesson baseline needs images stored at one size (prepare with --image-size)."
            )
        data = load_split(cfg.data.path, manifest, cfg.data.train_split)
    return SplitTensors(data.images[subset], data.labels[subset]) if subset is not None else data


def measure_lesson(
    cfg: Config,
    data: SplitTensors,
    num_classes: int,
    device: torch.device,
    steps: int,
    warmup: int,
    flops_per_image: float,
    peak: float,
    epoch: bool = False,
) -> tuple[Measurement, tuple[int, int, float] | None]:
    """The lesson's loop on the same model (surgery included), device and images; with `epoch`, then
    `lesson_epoch`'s (images, steps, seconds)."""
    from distvit.model.build import build_model
    from distvit.tools.lesson import LessonLoop, lesson_loader

    set_seed(cfg.train.seed)
    model, record = build_model(cfg.model, cfg.surgery, num_classes)
    model.to(device)
    loader = lesson_loader(data, record.img_size, cfg.train.batch_size, record.mean, record.std)
    loop = LessonLoop(model, loader, device)
    for _ in range(warmup):
        loop.step()
    loss, wall, timer = timed(partial(lesson_steps, loop, steps), device)
    if loss != loss:
        raise DataError("the lesson baseline's loss is NaN.")
    images = steps * loader.batch_size
    measured = measurement("lesson", images, wall, steps, timer, device, flops_per_image, peak, None)
    if not epoch:
        return measured, None
    del loop, loader  # its workers end before the epoch's fresh loader starts its own
    gc.collect()
    return measured, lesson_epoch(model, data, record, cfg.train.batch_size, device)


def compare_with_lesson(
    bench: TrainBench,
    cfg: Config,
    manifest: Manifest,
    data: SplitTensors,
    *,
    device: torch.device,
    steps: int,
    warmup: int,
    flops_per_image: float,
    peak: float,
    epoch: bool,
) -> None:
    """Measure the lesson on `data` and add it to `bench`, with every measurement's ratio to it (and the
    epochs' ratio with `epoch`). `peak`: the device's peak FLOP/s at the benchmark's precision; the
    lesson computes in fp32."""
    fp32_peak = peak if bench.mixed_precision == "no" else device_peak_flops(device, "no")[0]
    lesson, lesson_pass = measure_lesson(
        cfg, data, manifest.num_classes, device, steps, warmup, flops_per_image, fp32_peak, epoch
    )
    bench.results.append(lesson)
    for measured in bench.results:
        measured.ratio_to_lesson = measured.images_per_sec / lesson.images_per_sec
    if bench.epoch is not None and lesson_pass is not None:
        passed, count, seconds = lesson_pass
        bench.epoch.update(lesson_images=passed, lesson_steps=count, lesson_seconds=seconds)
        bench.epoch.update(lesson_images_per_sec=passed / seconds, ratio=seconds / bench.epoch["distvit_seconds"])
