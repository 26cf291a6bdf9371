"""`distvit bench train`'s results: what one loop measured (`Measurement`, made by `measurement`), the whole
benchmark (`TrainBench`), and their report: the table, the scaling line against a reference, the JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distvit.engine.timing import PhaseTimer
from distvit.errors import DataError
from distvit.tools.measure import peak_memory
from distvit.tools.profiling import epoch_line, profile_line

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
    """Host synchronisations CUDA's sync-debug mode reported per warm-up step (GPU only)."""
    host_sync_sites: list[str] = field(default_factory=list)
    """Where those synchronisations were called from (file:line), to find them."""
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


def measurement(
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
