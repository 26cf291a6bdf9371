"""`distvit bench decode`: its flags are checked before anything is generated, one error each."""

from __future__ import annotations

import pytest

from distvit.cli import build_parser
from distvit.errors import DistvitError


@pytest.fixture()
def no_work(monkeypatch):
    """Fail loudly if a case got past the checks: the benchmark would generate and time images."""
    import distvit.tools.bench_decode as bench_decode

    def run(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench_decode, "bench_decode", run)
    monkeypatch.setattr(bench_decode, "prepare_synthetic", run)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--images", "5", "--batch-size", "1", "--steps", "1"],
            "--images must be at least 10 (one per class of the synthetic images), got 5.",
        ),
        (["--images", "0"], "--images must be at least 10 (one per class of the synthetic images), got 0."),
        (["--stored-size", "4"], "--stored-size must be at least 8 pixels, got 4."),
        (
            ["--stored-size", "100000"],
            "--stored-size 100000 is larger than 16384 pixels, the largest image side a distvit manifest may "
            "declare (its readers allocate memory from it). Choose at most 16384.",
        ),
        (["--batch-size", "0"], "--batch-size must be positive, got 0."),
        (["--steps", "-3"], "--steps must be positive, got -3."),
        (
            ["--images", "100", "--batch-size", "64"],
            "--images 100 is fewer than the 1408 images that 20 timed + 2 warm-up batches of 64 read; raise --images.",
        ),
    ],
)
def test_a_bad_flag_is_one_error_before_anything_runs(flags, message, no_work):
    args = build_parser().parse_args(["bench", "decode", *flags])
    with pytest.raises(DistvitError) as error:
        args.action(args)
    assert str(error.value) == message


def test_sizes_this_host_cannot_hold_are_refused_before_generating(monkeypatch, no_work):
    from distvit.data import node

    monkeypatch.setattr(node, "available_host_memory", lambda: 8 * 10**9)
    args = build_parser().parse_args(["bench", "decode", "--stored-size", "16384", "--images", "200"])
    with pytest.raises(DistvitError) as error:
        args.action(args)
    assert str(error.value) == (
        "200 images of 16384 x 16384 px (--images, --stored-size) take about 1.0 TB of memory while they are "
        "generated, more than the 8.0 GB this host has available. Lower --stored-size or --images."
    )
