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
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from distvit.config import Config
from distvit.data.manifest import Manifest, SplitInfo
from distvit.data.memory import SplitTensors
from distvit.engine.accelerator import wait_for_everyone
from distvit.engine.timing import PhaseTimer
from distvit.errors import ConfigError, DataError
from distvit.tools.fast_path import check_fast_path
from distvit.tools.measure import count_host_syncs, device_peak_flops, peak_memory, train_flops_per_image
from distvit.tools.profiling import (
    distvit_epoch,
    epoch_line,
    lesson_epoch,
    lesson_steps,
    profile_line,
    profile_steps,
    timed,
)

PHASES = ("data", "forward_backward", "optimizer")


@dataclass
class Measurement:
    name: str
    images_per_sec: float
    step_ms: float
    steps: int
    phase_fractions: dict[str, float]
    """Share of the step time per phase (PHASES), and of "augment": the part of "data" spent making the
    model's input on the device (augmentation, resize, normalisation, mixing; 0 for the lesson, whose
    transforms run in its loader workers). On a GPU a phase is the device-timeline span between its CUDA
    events, so time the device waited for the host within the phase is part of it."""
    peak_memory_bytes: int
    peak_memory_kind: str
    achieved_tflops: float
    peak_fraction: float
    batch_size: int = 0
    host_syncs_per_step: float | None = None
    host_sync_sites: list[str] = field(default_factory=list)
    """Where those synchronisations were called from (file:line), to find them."""
    """Host synchronisations CUDA's sync-debug mode reported per warm-up step (GPU only)."""
    ratio_to_lesson: float | None = None


@dataclass
class TrainBench:
    config: dict[str, Any]
    device: str
    world_size: int
    mixed_precision: str
    compile_seconds: float
    feature_cache_seconds: float
    tokens_per_image: int
    train_gflops_per_image: float
    peak_tflops: float
    peak_source: str
    results: list[Measurement] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    """`--check`: the fast path against the fp32 eager reference (see `check_fast_path`)."""
    epoch: dict[str, Any] | None = None
    """`--epoch`: one epoch end to end (seconds: distvit = features + steps; lesson; ratio = lesson / distvit)."""
    profile: dict[str, Any] | None = None
    """`--profile`: the profiled window's headline numbers (see `distvit.tools.profiling`)."""


def _measurement(
    name: str,
    images: int,
    wall: float,
    steps: int,
    timer: PhaseTimer,
    device: torch.device,
    flops_per_image: float,
    peak: float,
    host_syncs: float | None,
) -> Measurement:
    phases = timer.seconds()
    total = sum(phases.values())
    fractions = {phase: phases.get(phase, 0.0) / total for phase in PHASES}
    # distvit's data phase is the fetch plus the device-side inputs; "augment" is that second part
    fractions["data"] += (phases.get("fetch", 0.0) + phases.get("inputs", 0.0)) / total
    fractions["augment"] = phases.get("inputs", 0.0) / total
    memory, memory_kind = peak_memory(device)
    rate = images / wall
    return Measurement(
        name=name,
        batch_size=images // steps,
        images_per_sec=rate,
        step_ms=1000 * wall / steps,
        steps=steps,
        phase_fractions=fractions,
        peak_memory_bytes=memory,
        peak_memory_kind=memory_kind,
        achieved_tflops=rate * flops_per_image / 1e12,
        peak_fraction=rate * flops_per_image / peak,
        host_syncs_per_step=host_syncs,
    )


def _run_steps(trainer, batches, count: int, timer: PhaseTimer | None = None) -> tuple[int, torch.Tensor]:
    """`count` training steps on `batches` (`DataSources.endless_batches`): images (all ranks), loss sum."""
    images, loss_sum = 0, torch.zeros((), device=trainer.accelerator.device)
    for _ in range(count):
        if timer:
            timer.start()
        batch, imgs, labels, local, global_batch, epoch = next(batches)
        loss_sum += trainer.step(batch, imgs, labels, local, global_batch, epoch, timer)
        images += batch.global_valid
    return images, loss_sum


def measure_distvit(trainer, steps: int, warmup: int, flops_per_image: float, peak: float) -> Measurement:
    device, accelerator = trainer.accelerator.device, trainer.accelerator
    trainer.parts.trained.train()
    batches = trainer.sources.endless_batches()

    def run(count: int, timer: PhaseTimer | None = None) -> tuple[int, torch.Tensor]:
        return _run_steps(trainer, batches, count, timer)

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
    measurement = _measurement(
        "distvit", images, slowest, steps, timer, device, flops_per_image, peak * accelerator.num_processes, host_syncs
    )
    measurement.host_sync_sites = sites
    return measurement


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
    """The lesson's loop (`distvit.tools.lesson`) on the same model (surgery included), device and images;
    with `epoch`, then `lesson_epoch`'s (images, steps, seconds)."""
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
    measured = _measurement("lesson", images, wall, steps, timer, device, flops_per_image, peak, None)
    if not epoch:
        return measured, None
    del loop, loader  # its workers end before the epoch's fresh loader starts its own
    gc.collect()
    return measured, lesson_epoch(model, data, record, cfg.train.batch_size, device)


def synthetic_splits(
    train_size: int, test_size: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> tuple[Manifest, dict[str, SplitTensors]]:
    """The built-in synthetic CIFAR-format data, generated in memory (no shards, no webdataset)."""
    from distvit.data.synthetic import CLASS_NAMES, generate

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
        source={"generator": "distvit.data.synthetic", "seed": seed},
    )
    return manifest, splits


def bench_train(
    cfg: Config,
    manifest: Manifest,
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

    cfg = dataclasses.replace(cfg)
    cfg.tracking = dataclasses.replace(cfg.tracking, backend="none")
    cfg.train = dataclasses.replace(cfg.train, resume="", log_every=10**9, stop_at_step=0)
    cfg.run = dataclasses.replace(cfg.run, overwrite=True)
    cfg.data = dataclasses.replace(cfg.data, trace_samples=False)
    if baseline == "lesson" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # before any rank starts
        raise ConfigError("--baseline lesson compares with the lesson's single-process loop: run it on one process.")
    trainer = Trainer(cfg, manifest, splits=splits)
    trainer.stops.close()  # a benchmark has nothing to checkpoint: SIGTERM / Ctrl-C end it at once
    accelerator, device = trainer.accelerator, trainer.accelerator.device
    precision = accelerator.mixed_precision
    checked = check_fast_path(trainer) if check else None
    peak, peak_source = device_peak_flops(device, precision)
    parts = trainer.parts
    size = parts.record.img_size
    images = torch.zeros(2, 3, size, size, device=device)
    full_flops = train_flops_per_image(parts.model, images)
    if parts.features_cached:  # a step trains the classifier on stored features
        flops = train_flops_per_image(parts.model.get_classifier(), trainer.sources.train.data.images[:2])
    else:
        flops = full_flops
    result = TrainBench(
        config=cfg.to_dict(),
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
    result.results.append(measure_distvit(trainer, steps, warmup, flops, peak))
    if epoch:
        result.epoch = distvit_epoch(trainer)
    if profile:
        batches = trainer.sources.endless_batches()
        _run_steps(trainer, batches, 1)  # a reader's start (stream mode) stays out of the window
        title = (
            f"distvit bench train --profile: {cfg.model.name}, batch {cfg.train.batch_size}, {result.device}; "
            f"unprofiled {result.results[0].step_ms:.2f} ms/step (the profiler adds host time per op)"
        )
        run = partial(_run_steps, trainer, batches)
        result.profile = profile_steps(
            run, device, profile, title, write=accelerator.is_main_process, unprofiled_step_ms=result.results[0].step_ms
        )
    subset = trainer.sources.subset  # the lesson trains on the same images
    accelerator.end_training()
    if baseline == "lesson":
        del trainer, images  # the lesson's peak memory is its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if splits is not None:
            lesson_data = splits[cfg.data.train_split]
        else:
            from distvit.data.memory import load_split

            if manifest.image_size is None:
                raise DataError(
                    f"{cfg.data.path}: the lesson baseline needs images stored at one size (prepare with --image-size)."
                )
            lesson_data = load_split(cfg.data.path, manifest, cfg.data.train_split)
        if subset is not None:
            lesson_data = SplitTensors(lesson_data.images[subset], lesson_data.labels[subset])
        fp32_peak = peak if precision == "no" else device_peak_flops(device, "no")[0]  # the lesson computes in fp32
        lesson, lesson_pass = measure_lesson(
            cfg, lesson_data, manifest.num_classes, device, steps, warmup, full_flops, fp32_peak, epoch
        )
        result.results.append(lesson)
        for measurement in result.results:
            measurement.ratio_to_lesson = measurement.images_per_sec / lesson.images_per_sec
        if result.epoch is not None and lesson_pass is not None:
            passed, count, seconds = lesson_pass
            result.epoch.update(lesson_images=passed, lesson_steps=count, lesson_seconds=seconds)
            result.epoch.update(lesson_images_per_sec=passed / seconds, ratio=seconds / result.epoch["distvit_seconds"])
    return result


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


def format_train_bench(bench: TrainBench) -> str:
    cfg = bench.config
    head = (
        f"distvit bench train: {cfg['model']['name']} at {cfg['surgery']['img_size'] or 'native'} px, "
        f"{bench.tokens_per_image} tokens/image, {bench.train_gflops_per_image:.3g} GFLOP/image (forward+backward); "
        f"batch {cfg['train']['batch_size']}, {bench.world_size} process(es) on {bench.device}, "
        f"precision {bench.mixed_precision}"
        + (f"; compiled in {bench.compile_seconds:.1f} s (excluded)" if bench.compile_seconds else "")
        + (
            f"; features cached in {bench.feature_cache_seconds:.1f} s (excluded)"
            if bench.feature_cache_seconds
            else ""
        )
        + f"\npeak {bench.peak_tflops:.1f} TFLOP/s ({bench.peak_source})"
    )
    columns = (
        f"{'loop':<8} {'images/s':>10} {'ms/step':>8} {'data':>6} {'augment':>8} {'fwd+bwd':>8} {'optim':>6} "
        f"{'peak mem':>10} {'TFLOP/s':>8} {'of peak':>8} {'syncs':>6} {'x lesson':>9}"
    )
    rows = []
    for m in bench.results:
        f = m.phase_fractions
        syncs = f"{m.host_syncs_per_step:>6.1f}" if m.host_syncs_per_step is not None else f"{'-':>6}"
        ratio = f"{m.ratio_to_lesson:>8.2f}x" if m.ratio_to_lesson is not None else f"{'-':>9}"
        rows.append(
            f"{m.name:<8} {m.images_per_sec:>10.0f} {m.step_ms:>8.1f} "
            f"{100 * f['data']:>5.1f}% {100 * f.get('augment', 0.0):>7.1f}% {100 * f['forward_backward']:>7.1f}% "
            f"{100 * f['optimizer']:>5.1f}% {m.peak_memory_bytes / 2**20:>8.0f}MB {m.achieved_tflops:>8.3f} "
            f"{100 * m.peak_fraction:>7.2f}% {syncs} {ratio}"
        )
    note = f"peak mem: {bench.results[0].peak_memory_kind}" if bench.results else ""
    lines = [head, columns, *rows, note]
    if bench.epoch:
        lines.append(epoch_line(bench.epoch))
    if bench.profile:
        lines.append(profile_line(bench.profile))
    if bench.check:
        c = bench.check
        lines.append(
            f"fast path vs fp32 reference ({c['precision']}, compiled={c['compiled']}, {c['steps']} steps): "
            "logits within "
            f"{100 * c['logit_error']:.2f}% (tolerance {100 * c['logit_tolerance']:.0f}%), losses within "
            f"{100 * c['loss_error']:.2f}% (tolerance {100 * c['loss_tolerance']:.0f}%), weight updates within "
            f"{100 * c['update_error']:.1f}% (tolerance {100 * c['update_tolerance']:.0f}%): "
            f"{'PASS' if c['passed'] else 'FAIL'}"
        )
    return "\n".join(lines)


def scaling_line(bench: TrainBench, reference_path: str | Path) -> str:
    """Scaling efficiency against a run of the same bench on fewer processes: per-process images/s here
    over per-process images/s there (1.0: perfect linear scaling)."""
    try:
        reference = json.loads(Path(reference_path).read_text())
        ref_rate, ref_world = float(reference["results"][0]["images_per_sec"]), int(reference["world_size"])
        if ref_rate <= 0 or ref_world <= 0:
            raise ValueError(f"images_per_sec {ref_rate} and world_size {ref_world} must be positive")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise DataError(
            f"--scaling-reference {reference_path}: not a `distvit bench train --json` result ({err})."
        ) from None
    rate, world = bench.results[0].images_per_sec, bench.world_size
    efficiency = (rate / world) / (ref_rate / ref_world)
    return (
        f"scaling: {world} process(es) {rate:.0f} images/s vs {ref_world} process(es) {ref_rate:.0f} images/s "
        f"({reference_path}): {rate / ref_rate:.2f}x, efficiency {efficiency:.1%}"
    )


def write_bench_json(path: str | Path, bench: TrainBench) -> None:
    from distvit.fileio import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(asdict(bench), indent=1) + "\n").encode())
