"""`distvit prepare synthetic|digits|cifar10|imagefolder`: flag checks, the dataset write and its summary
line. The importers themselves live in distvit.data (imported when a command runs)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from distvit.errors import DistvitError

DEFAULT_JPEG_QUALITY = 95


def write_dataset(args: argparse.Namespace, name: str, write: Callable[[], object]) -> object:
    """Shared by the prepare commands: common flag checks, OS errors as user errors, the summary line."""
    if args.samples_per_shard < 1:
        raise DistvitError(f"--samples-per-shard must be positive, got {args.samples_per_shard}.")
    if not 0 <= args.seed < 2**32:
        raise DistvitError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DistvitError(f"--out {args.out} is a file; pass a folder (it is created if missing).")
    try:
        result = write()
    except OSError as err:
        raise DistvitError(f"cannot read the source or write the dataset to --out {args.out}: {err}.") from None
    manifest = getattr(result, "manifest", result)
    counts = ", ".join(
        f"{split} {info.num_samples} ({len(info.shards)} shards)" for split, info in manifest.splits.items()
    )
    size = f"{manifest.image_size[0]}x{manifest.image_size[1]} px" if manifest.image_size else "sizes kept as found"
    print(f"wrote {name} dataset to {args.out}: {counts}; {manifest.num_classes} classes, {size}")
    return result


def synthetic_command(args: argparse.Namespace) -> int:
    from distvit.data.prepare.synthetic import MAX_CLASSES, generation_bytes, prepare_synthetic

    if not 2 <= args.num_classes <= MAX_CLASSES:
        raise DistvitError(f"--num-classes must be between 2 and {MAX_CLASSES}, got {args.num_classes}.")
    for flag, value in (("--train-size", args.train_size), ("--test-size", args.test_size)):
        if value < args.num_classes:
            raise DistvitError(f"{flag}={value} must be at least --num-classes ({args.num_classes}).")
    check_image_size(args.image_size, "--image-size")
    sizes = {"train_size": args.train_size, "test_size": args.test_size, "image_size": args.image_size}
    needed = generation_bytes(args.train_size, args.test_size, args.num_classes, args.image_size)
    check_generation_memory(needed, _generated(args), "Lower --image-size, --train-size or --test-size.")
    write_dataset(
        args, "synthetic", lambda: prepare_synthetic(args.out, num_classes=args.num_classes, **sizes, **_order(args))
    )
    return 0


def digits_command(args: argparse.Namespace) -> int:
    from distvit.data.prepare.digits import NUM_CLASSES, generation_bytes, prepare_digits

    for flag, value in (("--train-size", args.train_size), ("--test-size", args.test_size)):
        if value < NUM_CLASSES:
            raise DistvitError(f"{flag}={value} must be at least {NUM_CLASSES} (one image per digit).")
    check_image_size(args.image_size, "--image-size")
    sizes = {"train_size": args.train_size, "test_size": args.test_size, "image_size": args.image_size}
    needed = generation_bytes(args.train_size, args.test_size, args.image_size)
    check_generation_memory(needed, _generated(args), "Lower --image-size, --train-size or --test-size.")
    order = _order(args)
    del order["flip_safe"]  # digits are never flip-safe: the manifest says so with or without --no-flip
    write_dataset(args, "digits", lambda: prepare_digits(args.out, **sizes, **order))
    return 0


def check_image_size(size: int, flag: str) -> None:
    """A generated or resized image side: at least 8 px, and at most what a manifest may declare (its
    readers allocate from it, so a larger one could never be read back)."""
    from distvit.data.manifest import MAX_IMAGE_SIDE

    if size < 8:
        raise DistvitError(f"{flag} must be at least 8 pixels, got {size}.")
    if size > MAX_IMAGE_SIDE:
        raise DistvitError(
            f"{flag} {size} is larger than {MAX_IMAGE_SIDE} pixels, the largest image side a distvit manifest may "
            f"declare (its readers allocate memory from it). Choose at most {MAX_IMAGE_SIDE}."
        )


def check_generation_memory(needed: int, images: str, fix: str) -> None:
    """Generated images are made in memory before they are written: refuse, before allocating, what this
    host cannot hold (numpy would fail with a raw allocator error, or the kernel kill the process)."""
    from distvit.data.manifest import readable_bytes
    from distvit.data.node import available_host_memory

    available = available_host_memory()
    if available is not None and needed > available:
        raise DistvitError(
            f"{images} take about {readable_bytes(needed)} of memory while they are generated, more than the "
            f"{readable_bytes(available)} this host has available. {fix}"
        )


def _generated(args: argparse.Namespace) -> str:
    size = args.image_size
    return (
        f"{args.train_size} + {args.test_size} images of {size} x {size} px (--train-size, --test-size, --image-size)"
    )


def _order(args: argparse.Namespace) -> dict[str, object]:
    """The flags every importer shares: the seed of the write order, the shard size, the stored format,
    and whether flips keep the images' meaning (--no-flip)."""
    from distvit.data.prepare.writer import StoredFormat

    quality = DEFAULT_JPEG_QUALITY if args.quality is None else args.quality  # None: --quality not given
    if not 1 <= quality <= 100:
        raise DistvitError(f"--quality must be between 1 and 100, got {quality}.")
    if args.quality is not None and args.format != "jpeg":
        raise DistvitError(
            f"--quality {args.quality} applies to JPEG only, and the images are stored as {args.format} "
            "(lossless). Pass --format jpeg with it, or leave --quality out."
        )
    stored = StoredFormat(args.format, quality)
    return {
        "seed": args.seed,
        "samples_per_shard": args.samples_per_shard,
        "stored_format": stored,
        "flip_safe": not args.no_flip,
    }


def cifar10_command(args: argparse.Namespace) -> int:
    from distvit.data.prepare.cifar10 import prepare_cifar10

    source = {"source": args.source, "skip_checksum": args.skip_checksum}
    write_dataset(args, "CIFAR-10", lambda: prepare_cifar10(args.out, **source, **_order(args)))
    return 0


def imagefolder_command(args: argparse.Namespace) -> int:
    from distvit.data.prepare.imagefolder import LEAVES_SOURCE, prepare_imagefolder, printable

    if args.image_size is not None:
        check_image_size(args.image_size, "--image-size")
    if args.workers is not None and args.workers < 1:
        raise DistvitError(f"--workers must be at least 1, got {args.workers}.")
    options = {"val_fraction": args.val_fraction, "image_size": args.image_size, "strict": args.strict}
    write = lambda: prepare_imagefolder(args.source, args.out, **options, workers=args.workers, **_order(args))  # noqa: E731
    report = write_dataset(args, "image-folder", write)
    for path, reason in report.skipped:
        print(f"skipped {printable(path)}: {reason}", file=sys.stderr)  # control characters escaped
    leaving = sum(reason == LEAVES_SOURCE for _, reason in report.skipped)
    print(
        f"{len(report.skipped) - leaving} file(s) skipped as not decodable, {leaving} symbolic link(s) leading out "
        f"of the source skipped, {len(report.ignored)} hidden file(s) ignored"
    )
    return 0
