"""The `distvit bench` commands: their flag checks and reports around distvit.tools.bench_data and
distvit.tools.bench_train (imported only when a command runs: `import distvit.cli` stays light)."""

from __future__ import annotations

import argparse
import os

from distvit.errors import DistvitError
from distvit.fileio import check_output_file
from distvit.tools.preflight import is_local_leader, load_checked_config


def data_command(args: argparse.Namespace) -> int:
    """`distvit bench data`: flag checks, the readers against the lesson's pipeline, the table."""
    import platform

    import torch

    from distvit.data.manifest import read_manifest
    from distvit.tools.bench_data import bench_data, format_results, write_json

    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps), ("--img-size", args.img_size)):
        if value < 1:
            raise DistvitError(f"{flag} must be positive, got {value}.")
    if args.json:
        check_output_file(args.json, "--json")
    if args.workers < 0 or args.warmup < 0:
        raise DistvitError("--workers and --warmup must be 0 or more.")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise DistvitError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DistvitError(f"--device {args.device}: no CUDA device is available here.")
    split = read_manifest(args.data).split(args.split, args.data, key="--split")
    if args.batch_size > split.num_samples:
        raise DistvitError(
            f"--batch-size {args.batch_size} is larger than split '{args.split}' ({split.num_samples} images)."
        )
    results = bench_data(
        args.data, args.split, args.batch_size, args.steps, args.warmup, args.workers, args.img_size, args.device
    )
    context = {
        "data": args.data,
        "split": args.split,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "steps": args.steps,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": torch.cuda.get_device_name() if results and "cuda" in results[1].name else "cpu",
    }
    print(
        format_results(
            results,
            f"distvit bench data: {context['device']}, batch {args.batch_size}, "
            f"{args.img_size} px model input, {args.steps} timed batches each",
        )
    )
    if args.json:
        write_json(args.json, results, context)
    return 0


def train_command(args: argparse.Namespace) -> int:
    """The training step against the lesson's loop; under `accelerate launch -m distvit.cli bench train`
    on N ranks (without --baseline) it measures DDP."""
    from distvit.tools.bench_train import (
        bench_train,
        format_train_bench,
        scaling_line,
        synthetic_splits,
        write_bench_json,
    )

    if args.steps < 1 or args.warmup < 1:
        raise DistvitError(f"--steps and --warmup must be at least 1, got {args.steps} and {args.warmup}.")
    for flag, path in (("--profile", args.profile), ("--json", args.json)):
        if path:
            check_output_file(path, flag)
    args.overrides = [*args.overrides, f"run.dir={args.run_dir}", "run.overwrite=true"]  # a scratch directory
    splits = None
    if args.synthetic:
        from distvit.config import load_config
        from distvit.data.synthetic import MAX_CLASSES, generation_bytes
        from distvit.model.build import check_model_config
        from distvit.tools.dataset_checks import check_with_dataset
        from distvit.tools.prepare import check_generation_memory

        if args.synthetic < 20:
            raise DistvitError(f"--synthetic needs at least 20 training images, got {args.synthetic}.")
        cfg = load_config(args.config, args.overrides, check_data=False)
        sizes = (args.synthetic, max(args.synthetic // 5, 10))
        images = f"{sizes[0]} + {sizes[1]} images of 32 x 32 px (--synthetic)"
        check_generation_memory(generation_bytes(*sizes, MAX_CLASSES, 32), images, "Lower --synthetic.")
        manifest, splits = synthetic_splits(*sizes)
        cfg.data.train_split, cfg.data.eval_split = "train", "test"
        check_with_dataset(cfg, manifest)  # threads and crop padding, as load_checked_config checks them
        check_model_config(cfg.model, cfg.surgery, manifest.num_classes)
    else:
        cfg, manifest, _ = load_checked_config(args.config, args.overrides)
    result = bench_train(
        cfg, manifest, args.steps, args.warmup, args.baseline, splits, args.check, args.epoch, args.profile
    )
    if is_local_leader() and int(os.environ.get("RANK", "0")) == 0:
        print(format_train_bench(result), flush=True)
        if args.scaling_reference:
            print(scaling_line(result, args.scaling_reference), flush=True)
        if args.json:
            write_bench_json(args.json, result)
    return 1 if result.check and not result.check["passed"] else 0


def preflight_command(args: argparse.Namespace) -> int:
    """`distvit bench preflight`: hashing a dataset's shards at start-up, serial vs parallel vs requeue."""
    from distvit.data.node import usable_cores
    from distvit.tools.bench_preflight import bench_preflight, format_preflight

    if args.shards < 1 or args.shard_mb <= 0 or args.workers < 0:
        raise DistvitError("--shards and --shard-mb must be positive, --workers 0 or more.")
    workers = args.workers or usable_cores()
    shard_bytes = int(args.shard_mb * 1e6)
    print(format_preflight(bench_preflight(args.shards, shard_bytes, workers), args.shards, shard_bytes))
    return 0


def decode_command(args: argparse.Namespace) -> int:
    """`distvit bench decode`: decoding full-size images, PNG against JPEG, per core and in total."""
    import json
    from pathlib import Path

    import torch

    from distvit.data.synthetic import MAX_CLASSES, generation_bytes
    from distvit.tools.bench_decode import HELD_BYTES_PER_PIXEL, as_json, bench_decode, format_decode
    from distvit.tools.prepare import check_generation_memory, check_image_size

    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            raise DistvitError(f"{flag} must be positive, got {value}.")
    if args.images < MAX_CLASSES:
        raise DistvitError(
            f"--images must be at least {MAX_CLASSES} (one per class of the synthetic images), got {args.images}."
        )
    check_image_size(args.stored_size, "--stored-size")
    # generated in memory, then held encoded twice (PNG and JPEG) while the decoders are timed
    held = args.images * args.stored_size**2 * HELD_BYTES_PER_PIXEL
    needed = generation_bytes(args.images, MAX_CLASSES, MAX_CLASSES, args.stored_size) + held
    images = f"{args.images} images of {args.stored_size} x {args.stored_size} px (--images, --stored-size)"
    check_generation_memory(needed, images, "Lower --stored-size or --images.")
    if (args.steps + 2) * args.batch_size > args.images:  # one epoch: no loader start-up inside the timing
        raise DistvitError(
            f"--images {args.images} is fewer than the {(args.steps + 2) * args.batch_size} images that "
            f"{args.steps} timed + 2 warm-up batches of {args.batch_size} read; raise --images."
        )
    if args.device not in ("auto", "cpu", "cuda"):
        raise DistvitError(f"--device must be auto, cpu or cuda, got {args.device!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DistvitError("--device cuda: no CUDA device is available here.")
    if args.json:
        check_output_file(args.json, "--json")
    results = bench_decode(args.images, args.stored_size, args.batch_size, args.steps, args.device)
    print(format_decode(results))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(results), indent=1) + "\n")
    return 0
