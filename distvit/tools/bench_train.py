"""`distvit bench train`: the real training step, timed, against the lesson's loop in the same process.

distvit's side is the Trainer's `TrainStep` as training runs it (the config's data path, surgery, optimizer,
precision, compile, cached features, DDP over every launched rank), on endless epochs of the training
split, for `steps` steps after `warmup` steps. Reported: images/s (all ranks), milliseconds per step,
where the step time goes (data fetch and device transforms, forward+backward, optimizer; on a GPU the
device-timeline spans between CUDA events, host stalls within a phase included), peak memory,
tokens per image, training FLOPs per image (counted by torch's FlopCounterMode on a forward+backward),
achieved FLOP/s and its share of the device's peak. On a GPU the warm-up steps after the first run in
CUDA's sync-debug mode and count host synchronisations inside the step (there should be none).

`--baseline lesson` then runs `distvit.tools.lesson`'s loop on the same device, model and images; the
ratio is what to quote, as it holds on a noisy machine. Compile and feature-cache time are reported
apart and excluded from images/s.

`epoch=True` also times one whole epoch of the training split end to end: distvit's feature-cache pass
(head-only runs on cached features) plus exactly one epoch plan's steps, and the lesson's loop over a
fresh DataLoader (its workers' start included) for `len(loader)` steps. `profile=PATH` then runs a few
steps under torch.profiler and writes a summary there (`distvit.tools.profiling`).
"""

from __future__ import annotations

import dataclasses
import gc
import platform
from functools import partial
from pathlib import Path

import torch

from distvit.config import Config
from distvit.data.manifest import Manifest, SplitInfo
from distvit.data.node import launch
from distvit.data.read.memory import SplitTensors
from distvit.engine.accelerator import wait_for_everyone
from distvit.engine.timing import PhaseTimer
from distvit.errors import ConfigError, DataError
from distvit.tools.bench_lesson import compare_with_lesson, lesson_images
from distvit.tools.bench_report import Measurement, TrainBench, measurement
from distvit.tools.fast_path import check_fast_path
from distvit.tools.measure import count_host_syncs, device_peak_flops, train_flops_per_image
from distvit.tools.profiling import distvit_epoch, profile_steps, timed


def bench_train(
    cfg: Config,
    manifest: Manifest,
    *,
    steps: int = 30,
    warmup: int = 5,
    baseline: str | None = None,
    splits: dict[str, SplitTensors] | None = None,
    check: bool = False,
    epoch: bool = False,
    profile: str | Path | None = None,
) -> TrainBench:
    """Benchmark the configured training step (and the lesson's loop with baseline='lesson'); `epoch`:
    also one epoch end to end; `profile`: a profiler summary of a few steps written there."""
    from distvit.engine.trainer import Trainer

    cfg = _bench_config(cfg)
    if baseline == "lesson" and launch().world_size > 1:  # before any rank starts
        raise ConfigError("--baseline lesson compares with the lesson's single-process loop: run it on one process.")
    trainer = Trainer(cfg, manifest, splits=splits)
    trainer.stops.close()  # a benchmark has nothing to checkpoint: SIGTERM / Ctrl-C end it at once
    device = trainer.accelerator.device
    checked = check_fast_path(trainer) if check else None
    result, flops, full_flops, peak = _describe(trainer, checked)
    result.results.append(measure_distvit(trainer, steps, warmup, flops, peak))
    if epoch:
        result.epoch = distvit_epoch(trainer)
    if profile:
        result.profile = _profile(trainer, result, profile)
    subset = trainer.sources.subset  # the lesson trains on the same images
    trainer.accelerator.end_training()
    if baseline == "lesson":
        del trainer  # the lesson's peak memory is its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        data = lesson_images(cfg, manifest, splits, subset)
        compare_with_lesson(
            result,
            cfg,
            manifest,
            data,
            device=device,
            steps=steps,
            warmup=warmup,
            flops_per_image=full_flops,
            peak=peak,
            epoch=epoch,
        )
    return result


def _bench_config(cfg: Config) -> Config:
    """The config as the benchmark trains it: no tracking, resume, logging, planned stop or sample trace,
    in a scratch run directory it may replace."""
    cfg = dataclasses.replace(cfg)
    cfg.tracking = dataclasses.replace(cfg.tracking, backend="none")
    cfg.train = dataclasses.replace(cfg.train, resume="", log_every=10**9, stop_at_step=0)
    cfg.run = dataclasses.replace(cfg.run, overwrite=True)
    cfg.data = dataclasses.replace(cfg.data, trace_samples=False)
    return cfg


def _describe(trainer, checked: dict | None) -> tuple[TrainBench, float, float, float]:
    """The benchmark's description before any measurement; the training FLOPs per image of a step (the
    classifier's alone on cached features) and of the full model, and the device's peak FLOP/s."""
    accelerator, device, parts = trainer.accelerator, trainer.accelerator.device, trainer.parts
    precision = accelerator.mixed_precision
    peak, peak_source = device_peak_flops(device, precision)
    size = parts.record.img_size
    full_flops = train_flops_per_image(parts.model, torch.zeros(2, 3, size, size, device=device))
    if parts.features_cached:  # a step trains the classifier on stored features
        flops = train_flops_per_image(parts.model.get_classifier(), trainer.sources.train.data.images[:2])
    else:
        flops = full_flops
    bench = TrainBench(
        config=trainer.cfg.to_dict(),
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        world_size=accelerator.num_processes,
        mixed_precision=precision,
        compile_seconds=parts.compile_seconds,
        feature_cache_seconds=trainer.sources.feature_seconds or 0.0,
        tokens_per_image=parts.record.tokens_per_image,
        train_gflops_per_image=flops / 1e9,
        peak_tflops=peak / 1e12,
        peak_source=peak_source,
        versions=_versions(),
        check=checked,
    )
    return bench, flops, full_flops, peak


def _run_steps(trainer, steps, count: int, timer: PhaseTimer | None = None) -> tuple[int, torch.Tensor]:
    """`count` training steps from `steps` (`DataSources.endless_inputs`): images (all ranks), loss sum."""
    images, loss_sum = 0, torch.zeros((), device=trainer.accelerator.device)
    for _ in range(count):
        if timer:
            timer.start()
        data = next(steps)
        loss_sum += trainer.step(data, timer)
        images += data.batch.global_valid
    return images, loss_sum


def measure_distvit(trainer, steps: int, warmup: int, flops_per_image: float, peak: float) -> Measurement:
    device, accelerator = trainer.accelerator.device, trainer.accelerator
    trainer.parts.trained.train()
    inputs = trainer.sources.endless_inputs()

    def run(count: int, timer: PhaseTimer | None = None) -> tuple[int, torch.Tensor]:
        return _run_steps(trainer, inputs, count, timer)

    unchecked = min(warmup, 2)  # the first steps set up kernels, allocator pools and (step 2) DDP's buckets

    def checked_warmup() -> int:
        run(warmup - unchecked)
        return warmup - unchecked

    run(unchecked)
    sites: list[str] = []
    host_syncs = count_host_syncs(checked_warmup, sites)
    wait_for_everyone(accelerator)
    (images, loss_sum), wall, timer = timed(lambda timer: run(steps, timer), device)
    if not torch.isfinite(loss_sum):
        raise DataError(f"the benchmark's training loss is {loss_sum.item()}: the configuration diverges.")
    slowest = (
        accelerator.gather(torch.tensor([wall], device=device)).max().item()
    )  # all ranks' images in the slowest rank's time
    # every rank has its own device (GPU, or its share of the CPU cores): the peak adds up
    measured = measurement(
        "distvit", images, slowest, steps, timer, device, flops_per_image, peak * accelerator.num_processes, host_syncs
    )
    measured.host_sync_sites = sites
    return measured


def _profile(trainer, bench: TrainBench, path: str | Path) -> dict:
    """A few training steps under torch.profiler, after the measurement (see distvit.tools.profiling)."""
    inputs = trainer.sources.endless_inputs()
    _run_steps(trainer, inputs, 1)  # a reader's start (stream mode) stays out of the window
    cfg, step_ms = trainer.cfg, bench.results[0].step_ms
    title = (
        f"distvit bench train --profile: {cfg.model.name}, batch {cfg.train.batch_size}, {bench.device}; "
        f"unprofiled {step_ms:.2f} ms/step (the profiler adds host time per op)"
    )
    run = partial(_run_steps, trainer, inputs)
    device, main = trainer.accelerator.device, trainer.accelerator.is_main_process
    return profile_steps(run, device, path, title, write=main, unprofiled_step_ms=step_ms)


def synthetic_splits(
    train_size: int, test_size: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> tuple[Manifest, dict[str, SplitTensors]]:
    """The built-in synthetic CIFAR-format data, generated in memory (no shards, no webdataset)."""
    from distvit.data.prepare.synthetic import CLASS_NAMES, generate

    splits = {}
    for offset, (name, size) in enumerate((("train", train_size), ("test", test_size))):
        images, labels = generate(size, num_classes, image_size, seed=seed * 2 + offset)
        splits[name] = SplitTensors(torch.from_numpy(images), torch.from_numpy(labels))
    manifest = Manifest(
        dataset="synthetic (in memory)",
        classes=list(CLASS_NAMES[:num_classes]),
        image_size=(image_size, image_size),
        channels=3,
        splits={name: SplitInfo(name, len(split), []) for name, split in splits.items()},
        source={"generator": "distvit.data.prepare.synthetic", "seed": seed},
    )
    return manifest, splits


def _versions() -> dict[str, str]:
    import accelerate
    import timm

    versions = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions
