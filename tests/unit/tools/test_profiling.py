"""distvit.tools.profiling: the epoch and profile report lines, the device's busy share, the profiled
window on a CPU (a real torch.profiler run) and a failing profiler that leaves the steps alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distvit.errors import DistvitError
from distvit.fileio import check_output_file
from distvit.tools.bench_report import format_train_bench
from distvit.tools.profiling import busy_fraction, device_share, epoch_line, profile_line, profile_steps
from tests.unit.tools.test_bench_report import _bench, _measurement

EPOCH = {
    "images": 10000,
    "steps": 157,
    "feature_seconds": 4.25,
    "steps_seconds": 0.5,
    "distvit_seconds": 4.75,
    "distvit_images_per_sec": 10000 / 4.75,
}


def test_epoch_line_with_and_without_the_lesson():
    assert epoch_line(EPOCH) == (
        "one epoch of 10000 images end to end: distvit 4.75 s (features 4.25 s + steps 0.50 s), 2105 images/s"
    )
    lesson = {**EPOCH, "lesson_images": 9984, "lesson_steps": 156, "lesson_seconds": 95.0, "ratio": 20.0}
    assert epoch_line(lesson) == (
        "one epoch of 10000 images end to end: distvit 4.75 s (features 4.25 s + steps 0.50 s), "
        "lesson 95.00 s (9984 images: its loader drops the last partial batch): 20.00x faster"
    )
    slower = {**lesson, "lesson_images": 10000, "lesson_seconds": 3.8, "ratio": 0.8}
    assert epoch_line(slower).endswith("), lesson 3.80 s: 1.25x slower")


def test_the_report_ends_with_the_epoch_and_profile_lines():
    profile = {
        "steps": 5,
        "window_seconds": 0.0123,
        "device_busy_fraction": 0.62,
        "sorted_by": "self device time",
        "top": [
            {"name": "sm90_xmma_gemm", "share": 0.41, "ms": 5.0},
            {"name": "flash_fwd", "share": 0.2, "ms": 2.4},
            {"name": "adamw", "share": 0.1, "ms": 1.2},
            {"name": "elementwise", "share": 0.05, "ms": 0.6},
        ],
        "path": "out/profile.txt",
    }
    bench = _bench(results=[_measurement("distvit", 1000.0, None)], epoch=EPOCH, profile=profile)
    lines = format_train_bench(bench).splitlines()
    assert lines[-2] == epoch_line(EPOCH)
    assert lines[-1] == (
        "profile: 5 steps in 0.012 s, device busy 62%, host gaps 38%; top by self device time: "
        "sm90_xmma_gemm 41%, flash_fwd 20%, adamw 10% (table in out/profile.txt)"
    )
    assert (
        format_train_bench(dataclasses.replace(bench, epoch=None, profile=None))
        .splitlines()[-1]
        .startswith("peak mem: ")
    )
    failed = {"steps": 5, "window_seconds": 0.1, "error": "RuntimeError: no CUPTI", "path": "p.txt"}
    assert profile_line(failed) == "profile: the profiler failed (RuntimeError: no CUPTI); see p.txt"


def test_the_device_share_is_taken_against_the_unprofiled_step():
    """The H200's 32/p4 profile: busy 45% of a 169.7 ms window of 5 steps (33.9 ms/step with the profiler's
    host overhead) is 15.3 ms of device work per step; the step runs in 24.2 ms without the profiler, so the
    device is busy 63% of it (not 45%): partly bound by the host."""
    share = device_share(0.45, 0.1697, 5, 24.2)
    assert share["device_ms_per_step"] == pytest.approx(15.273)
    assert share["device_busy_unprofiled"] == pytest.approx(15.273 / 24.2)
    assert device_share(0.9, 0.1, 5, 10.0)["device_busy_unprofiled"] == 1.0  # capped: timing noise
    assert "device_busy_unprofiled" not in device_share(0.5, 0.1, 5, None)
    profile = {
        "steps": 5,
        "window_seconds": 0.1697,
        "device_busy_fraction": 0.45,
        "sorted_by": "self device time",
        "top": [{"name": "gemm", "share": 0.5, "ms": 1.0}],
        "path": "p.txt",
        **share,
    }
    assert profile_line(profile) == (
        "profile: 5 steps in 0.170 s, device busy 63%, host gaps 37% (15.3 ms of device work per 24.2 ms step); "
        "top by self device time: gemm 50% (table in p.txt)"
    )


def test_busy_fraction_is_the_union_of_the_intervals():
    # 0-10 and 5-15 overlap (15 covered), 20-30 adds 10, 22-25 lies inside it: 25 of 40
    assert busy_fraction([(20, 30), (0, 10), (5, 15), (22, 25)], 40) == pytest.approx(25 / 40)
    assert busy_fraction([], 40) == 0.0 and busy_fraction([(0, 50)], 40) == 1.0
    assert busy_fraction([(0, 1)], 0) == 0.0


def test_the_profile_path_must_be_a_file_in_an_existing_folder(tmp_path):
    assert check_output_file(str(tmp_path / "p.txt"), "--profile") == tmp_path / "p.txt"
    with pytest.raises(DistvitError, match="does not exist; create it first"):
        check_output_file(str(tmp_path / "missing" / "p.txt"), "--profile")
    with pytest.raises(DistvitError, match="is a folder"):
        check_output_file(str(tmp_path), "--profile")


def _linear_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def run(count: int) -> None:
        calls.append(count)
        for _ in range(count):
            optimizer.zero_grad()
            model(torch.randn(32, 64)).square().mean().backward()
            optimizer.step()

    return run, calls


def test_profile_steps_on_a_cpu_writes_the_table(tmp_path):
    run, calls = _linear_steps()
    path = tmp_path / "profile.txt"
    summary = profile_steps(run, torch.device("cpu"), path, "title line", steps=4)
    assert calls == [4]
    assert summary["steps"] == 4 and summary["path"] == str(path) and "error" not in summary
    assert summary["device_busy_fraction"] is None and summary["sorted_by"] == "self CPU time"
    assert 0 < summary["window_seconds"] < 10 and len(summary["top"]) == 5
    assert sum(top["share"] for top in summary["top"]) <= 1.0 + 1e-9
    names = {top["name"] for top in summary["top"]}
    assert "aten::addmm" in names or "aten::mm" in names, names
    lines = path.read_text().splitlines()
    assert lines[0] == "title line" and lines[1].startswith("window: ") and lines[1].endswith(" ms/step)")
    assert lines[2] == "CPU: no device timeline; the table is sorted by self CPU time"
    assert lines[5] == "top 25 by self CPU time:"
    table = "\n".join(lines[6:])
    assert "aten::addmm" in table and "Self CPU time total:" in table
    # one row per op: 4 calls of the linear layer's addmm in 4 steps
    (addmm,) = [line for line in lines if line.strip().startswith("aten::addmm ")]
    assert addmm.split()[-1] == "4"


def test_a_failing_profiler_is_reported_and_the_steps_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    run, calls = _linear_steps()
    path = tmp_path / "profile.txt"
    summary = profile_steps(run, torch.device("cpu"), path, "title line")
    assert calls == [5]  # every rank takes the same steps, profiled or not
    assert summary["error"] == "RuntimeError: no profiler here" and summary["steps"] == 5
    assert path.read_text() == (
        "title line\nthe profiler failed, the benchmark's numbers stand: RuntimeError: no profiler here\n"
    )
    assert profile_line(summary) == f"profile: the profiler failed (RuntimeError: no profiler here); see {path}"
