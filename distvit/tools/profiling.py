"""Where `distvit bench train`'s time goes beyond the step rate: one epoch end to end, and a profile.

`--epoch`: one epoch of the training split, timed wall-clock from an idle device to a synchronised one.
distvit's is its feature-cache pass (head-only runs on cached features, timed when the Trainer built
it) plus exactly one epoch plan's steps, run as training runs them; the lesson's is its loop over a
fresh DataLoader for `len(loader)` steps (the workers' start included, as the lesson pays it; the
loader drops the last partial batch). Compile time and process start are not in either.

`--profile PATH`: after the benchmark's measurements (so the steps are warm), `PROFILE_STEPS` of
distvit's training steps run under the profiler (CPU activity, and CUDA on a GPU). PATH gets the
profiled window's wall time, on a GPU the device's busy share (the union of its kernels', copies' and
memsets' intervals over the window: the rest, the host gaps, is where the GPU waited for the host), and
torch's table of the top ops and kernels by self device time (self CPU time on a CPU). The headline
numbers come back as a dict for the benchmark's JSON. A profiler failure is written into PATH and
returned as `error`: the benchmark's own numbers matter more, and every rank still runs the same steps
(DDP needs them all).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from distvit.data.read.memory import SplitTensors
from distvit.engine.accelerator import wait_for_everyone
from distvit.engine.timing import PhaseTimer, synchronize
from distvit.errors import DataError

PROFILE_STEPS = 5
TOP_ROWS = 25
HEADLINE_TOP = 5


def timed(run, device: torch.device) -> tuple[Any, float, PhaseTimer]:
    """`run(timer)` from an idle device and a fresh peak-memory count: its result, wall seconds, timer."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = PhaseTimer(device)
    start = time.perf_counter()
    result = run(timer)
    synchronize(device)
    return result, time.perf_counter() - start, timer


def distvit_epoch(trainer) -> dict[str, Any]:
    """One epoch plan of the training split, step by step as training runs it, from an idle device to a
    synchronised one (the slowest rank's time), plus the feature-cache pass where features are cached."""
    device, accelerator, sources = trainer.accelerator.device, trainer.accelerator, trainer.sources
    trainer.parts.trained.train()
    plan, local = sources.epoch_plan(0)

    def run(_timer) -> tuple[int, torch.Tensor]:
        images, loss_sum = 0, torch.zeros((), device=device)
        for data in sources.epoch_inputs(0, plan, local):
            loss_sum += trainer.step(data)
            images += data.batch.global_valid
        return images, loss_sum

    wait_for_everyone(accelerator)
    (images, loss_sum), wall, _ = timed(run, device)
    if not torch.isfinite(loss_sum):
        raise DataError(f"the benchmark's epoch loss is {loss_sum.item()}: the configuration diverges.")
    wall = accelerator.gather(torch.tensor([wall], device=device)).max().item()
    features = (sources.feature_seconds or 0.0) if trainer.parts.features_cached else 0.0
    return {
        "images": images,
        "steps": len(plan),
        "feature_seconds": features,
        "steps_seconds": wall,
        "distvit_seconds": features + wall,
        "distvit_images_per_sec": images / (features + wall),
    }


def lesson_epoch(model: torch.nn.Module, data: SplitTensors, record, batch_size: int, device: torch.device):
    """The lesson's loop over a fresh DataLoader for one pass of `data` (`len(loader)` steps, the workers'
    start included): (images, steps, seconds)."""
    from distvit.tools.lesson import LessonLoop, lesson_loader

    loader = lesson_loader(data, record.img_size, batch_size, record.mean, record.std)
    loop, steps, images = LessonLoop(model, loader, device), len(loader), len(loader) * loader.batch_size
    loss, wall, _ = timed(partial(lesson_steps, loop, steps), device)
    if loss != loss:
        raise DataError("the lesson baseline's epoch loss is NaN.")
    return images, steps, wall  # the loader's persistent workers end with it, here


def epoch_line(epoch: dict[str, Any]) -> str:
    """One line of the benchmark's report."""
    line = (
        f"one epoch of {epoch['images']} images end to end: distvit {epoch['distvit_seconds']:.2f} s "
        f"(features {epoch['feature_seconds']:.2f} s + steps {epoch['steps_seconds']:.2f} s)"
    )
    if epoch.get("lesson_seconds") is None:
        return f"{line}, {epoch['distvit_images_per_sec']:.0f} images/s"
    lesson = f"lesson {epoch['lesson_seconds']:.2f} s"
    if epoch["lesson_images"] != epoch["images"]:
        lesson += f" ({epoch['lesson_images']} images: its loader drops the last partial batch)"
    ratio = epoch["ratio"]
    return f"{line}, {lesson}: " + (f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower")


def lesson_steps(loop, count: int, timer: PhaseTimer | None = None) -> float:
    """`count` steps of a `LessonLoop`: its last running loss."""
    loss = float("nan")
    for _ in range(count):
        loss = loop.step(timer)
    return loss


def profile_steps(
    run_steps: Callable[[int], None],
    device: torch.device,
    path: str | Path,
    title: str,
    write: bool = True,
    steps: int = PROFILE_STEPS,
    unprofiled_step_ms: float | None = None,
) -> dict[str, Any]:
    """Run `run_steps(steps)` under the profiler (on every rank, so the ranks stay alike) and write the
    summary to `path` (`write`: this rank writes it); returns the headline numbers (or {"error": ...})."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler, error = None, None
    try:
        with warnings.catch_warnings():  # one window: torch's note on events cleared between cycles is moot
            warnings.simplefilter("ignore")
            profiler = profile(activities=activities)
            profiler.start()
    except Exception as err:  # the steps below still run: every rank takes the same steps
        profiler, error = None, err
    synchronize(device)
    start = time.perf_counter()
    try:
        run_steps(steps)
        synchronize(device)
    finally:
        window = time.perf_counter() - start
        if profiler is not None:
            try:
                profiler.stop()
            except Exception as err:
                profiler, error = None, err
    try:
        if profiler is None:
            raise error or RuntimeError("the profiler did not start")
        summary, text = _summarise(profiler, cuda, window, steps, title, unprofiled_step_ms)
    except Exception as err:
        summary = {"steps": steps, "window_seconds": window, "error": f"{type(err).__name__}: {err}"}
        text = f"{title}\nthe profiler failed, the benchmark's numbers stand: {summary['error']}\n"
    summary["path"] = str(path)
    if write:
        from distvit.fileio import atomic_write_bytes

        try:
            atomic_write_bytes(Path(path), text.encode())
        except OSError as err:
            summary["error"] = f"--profile {path}: not written ({err})"
    return summary


def busy_fraction(intervals: list[tuple[float, float]], window: float) -> float:
    """Share of `window` (same unit as the intervals) covered by the union of `intervals`."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return min(covered / window, 1.0) if window > 0 else 0.0


def device_share(busy: float, window: float, steps: int, unprofiled_step_ms: float | None) -> dict[str, float]:
    """The device's kernel time per step, and its share of the step as it runs without the profiler:
    the profiler slows the host (every op is recorded), not the kernels, so the profiled window's host
    gaps overstate the real ones; device time over the unprofiled step time does not."""
    device_ms = 1000 * busy * window / steps
    shares = {"device_ms_per_step": device_ms}
    if unprofiled_step_ms:
        shares["unprofiled_step_ms"] = unprofiled_step_ms
        shares["device_busy_unprofiled"] = min(device_ms / unprofiled_step_ms, 1.0)
    return shares


def _summarise(
    profiler, cuda: bool, window: float, steps: int, title: str, unprofiled_step_ms: float | None = None
) -> tuple[dict[str, Any], str]:
    from torch.autograd import DeviceType

    def annotation_span(event) -> bool:  # record_function spans on the GPU's timeline cover the kernels in them
        return event.device_type == DeviceType.CUDA and bool(getattr(event, "is_user_annotation", False))

    averages = profiler.key_averages()
    if cuda:  # kernels, copies and memsets: the device's own timeline
        device_events = [e for e in profiler.events() if e.device_type == DeviceType.CUDA and not annotation_span(e)]
        averages[:] = [row for row in averages if not annotation_span(row)]
        totals = _totals((e.name, e.time_range.end - e.time_range.start) for e in device_events)
        busy = busy_fraction([(e.time_range.start, e.time_range.end) for e in device_events], window * 1e6)
        sort_by, unit = "self_cuda_time_total", "self device time"
    else:
        totals = _totals((e.key, e.self_cpu_time_total) for e in averages if e.device_type == DeviceType.CPU)
        busy, sort_by, unit = None, "self_cpu_time_total", "self CPU time"
    total = sum(totals.values())
    top = sorted(totals.items(), key=lambda item: -item[1])[:HEADLINE_TOP]
    summary = {
        "steps": steps,
        "window_seconds": window,
        "device_busy_fraction": busy,
        "sorted_by": unit,
        "top": [{"name": name, "share": us / total if total else 0.0, "ms": us / 1000} for name, us in top],
    }
    if busy is not None:
        summary |= device_share(busy, window, steps, unprofiled_step_ms)
    lines = [title, f"window: {window:.4f} s wall for {steps} steps ({1000 * window / steps:.2f} ms/step)"]
    if busy is not None:
        lines.append(
            f"device busy: {busy:.1%} of the window (union of kernels, copies and memsets); host gaps "
            f"{1 - busy:.1%} (the GPU waiting for the host, inflated by the profiler's own host time)"
        )
        if "device_busy_unprofiled" in summary:
            real = summary["device_busy_unprofiled"]
            lines.append(
                f"without the profiler: {summary['device_ms_per_step']:.2f} ms of device work per "
                f"{unprofiled_step_ms:.2f} ms step, busy {real:.0%}: {_bound(real)}"
            )
    else:
        lines.append("CPU: no device timeline; the table is sorted by self CPU time")
    lines.append(
        f"top {HEADLINE_TOP} by {unit}: "
        + ", ".join(f"{_short(t['name'], 100)} {t['share']:.1%}" for t in summary["top"])
    )
    if cuda:
        lines.append("(record_function spans on the GPU's timeline, e.g. Optimizer.step#..., are left out)")
    table = averages.table(sort_by=sort_by, row_limit=TOP_ROWS, max_name_column_width=80)
    return summary, "\n".join([*lines, "", f"top {TOP_ROWS} by {unit}:", table, ""])


def _short(name: str, width: int = 60) -> str:
    """A kernel's name for one line (templated CUDA kernels run to hundreds of characters)."""
    return name if len(name) <= width else name[: width - 3] + "..."


def _bound(busy: float) -> str:
    if busy >= 0.9:
        return "bound by the GPU's kernels"
    return "bound by the host" if busy < 0.5 else "partly bound by the host"


def _totals(pairs) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, us in pairs:
        totals[name] = totals.get(name, 0.0) + us
    return totals


def profile_line(profile: dict[str, Any]) -> str:
    """One line of the benchmark's report."""
    if profile.get("error"):
        return f"profile: the profiler failed ({profile['error']}); see {profile['path']}"
    busy = profile.get("device_busy_unprofiled", profile["device_busy_fraction"])
    share = f"device busy {busy:.0%}, host gaps {1 - busy:.0%}" if busy is not None else "CPU"
    if "device_busy_unprofiled" in profile:
        share += (
            f" ({profile['device_ms_per_step']:.1f} ms of device work per {profile['unprofiled_step_ms']:.1f} ms step)"
        )
    top = ", ".join(f"{_short(t['name'])} {t['share']:.0%}" for t in profile["top"][:3])
    return (
        f"profile: {profile['steps']} steps in {profile['window_seconds']:.3f} s, {share}; "
        f"top by {profile['sorted_by']}: {top} (table in {profile['path']})"
    )
