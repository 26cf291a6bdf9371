"""The `distvit bench` commands: their flags (`add_commands`), flag checks and reports around
distvit.tools.bench_data, bench_train, bench_decode and bench_preflight (imported only when a command
runs: `import distvit.cli` stays light)."""

from __future__ import annotations

import argparse

from distvit.data.node import launch
from distvit.errors import DistvitError
from distvit.fileio import check_output_file
from distvit.tools.preflight import add_config_arguments, load_checked_config


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
    from distvit.tools.bench_report import format_train_bench, scaling_line, write_bench_json
    from distvit.tools.bench_train import bench_train, synthetic_splits

    if args.steps < 1 or args.warmup < 1:
        raise DistvitError(f"--steps and --warmup must be at least 1, got {args.steps} and {args.warmup}.")
    for flag, path in (("--profile", args.profile), ("--json", args.json)):
        if path:
            check_output_file(path, flag)
    args.overrides = [*args.overrides, f"run.dir={args.run_dir}", "run.overwrite=true"]  # a scratch directory
    splits = None
    if args.synthetic:
        from distvit.config import load_config
        from distvit.data.prepare.synthetic import MAX_CLASSES, generation_bytes
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
        cfg,
        manifest,
        steps=args.steps,
        warmup=args.warmup,
        baseline=args.baseline,
        splits=splits,
        check=args.check,
        epoch=args.epoch,
        profile=args.profile,
    )
    here = launch()
    if here.local_leader and here.rank == 0:
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

    from distvit.data.prepare.synthetic import MAX_CLASSES, generation_bytes
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


def add_commands(commands) -> None:
    """`distvit bench data|train|decode|preflight`: their flags, and the actions below."""
    bench = commands.add_parser("bench", help="benchmarks against the lesson's baseline, in the same process")
    benches = bench.add_subparsers(dest="bench", required=True)
    data = benches.add_parser(
        "data", help="images/s delivered to the device: distvit readers vs the lesson's DataLoader"
    )
    data.add_argument("--data", required=True, help="dataset folder (distvit prepare ...)")
    data.add_argument("--split", default="train")
    data.add_argument("--batch-size", type=int, default=256)
    data.add_argument("--steps", type=int, default=40, help="timed batches per pipeline (after 5 warm-up batches)")
    data.add_argument("--warmup", type=int, default=5)
    data.add_argument("--workers", type=int, default=2, help="decode workers of distvit's stream reader")
    data.add_argument("--img-size", type=int, default=32, help="model input size (the lesson resizes with PIL)")
    data.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    data.add_argument("--json", default=None, help="also write the results as JSON here")
    data.set_defaults(action=data_command)

    _add_train_command(benches)

    decode = benches.add_parser(
        "decode", help="decoding images stored at full size: raw decoders, the lesson, PNG and JPEG shards, per core"
    )
    decode.add_argument("--images", type=int, default=1536, help="synthetic images written in each format")
    decode.add_argument("--stored-size", type=int, default=224, help="the images' stored size in pixels")
    decode.add_argument("--batch-size", type=int, default=64)
    decode.add_argument("--steps", type=int, default=20, help="timed batches per case (after 2 warm-up batches)")
    decode.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    decode.add_argument("--json", default=None, help="also write the results as JSON here")
    decode.set_defaults(action=decode_command)

    preflight = benches.add_parser(
        "preflight", help="start-up shard hashing: serial vs parallel, and a requeue that skips verified shards"
    )
    preflight.add_argument("--shards", type=int, default=1000, help="number of shards")
    preflight.add_argument("--shard-mb", type=float, default=1.0, help="size of each shard in MB")
    preflight.add_argument("--workers", type=int, default=0, help="hashing threads (0: the usable cores)")
    preflight.set_defaults(action=preflight_command)


def _add_train_command(benches) -> None:
    """`distvit bench train`'s flags (the config's, then the benchmark's)."""
    train_bench = benches.add_parser(
        "train",
        help="the training step's images/s, time breakdown, memory and FLOP/s; with --baseline lesson, the ratio",
    )
    add_config_arguments(train_bench)
    train_bench.add_argument(
        "--baseline", choices=["lesson"], default=None, help="also run the lesson's loop (one process)"
    )
    train_bench.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    train_bench.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (the host-sync check runs on them)"
    )
    train_bench.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="train on N synthetic CIFAR-format images generated in memory instead of data.path",
    )
    train_bench.add_argument(
        "--check",
        action="store_true",
        help="first train the configured fast path and an fp32 eager reference side by side; exit 1 if they disagree",
    )
    train_bench.add_argument(
        "--epoch",
        action="store_true",
        help="also time one whole epoch of the training split end to end (feature-cache pass included), "
        "and with --baseline lesson the lesson's epoch (its DataLoader's start included)",
    )
    train_bench.add_argument(
        "--profile",
        default=None,
        metavar="PATH",
        help="then profile a few training steps (torch.profiler) and write the top ops/kernels, the window's "
        "time and, on a GPU, the device's busy share to this text file",
    )
    train_bench.add_argument("--run-dir", default="runs/bench", help="scratch run directory (replaced)")
    train_bench.add_argument("--json", default=None, help="also write the results as JSON here")
    train_bench.add_argument(
        "--scaling-reference",
        default=None,
        metavar="JSON",
        help="a --json result of the same bench on fewer processes: print the scaling efficiency against it",
    )
    train_bench.set_defaults(action=train_command)
