"""The `distvit` command (`distvit --help` lists the same, in this order).

    distvit prepare synthetic|digits|cifar10|imagefolder --out DIR [...]   a dataset as shards + manifest
    distvit config --config FILE [key=value ...] [--get SECTION.KEY]      validate and print the resolved config
    distvit bench data --data DIR [...]          reader images/s against the lesson's pipeline
    distvit bench train --config FILE [--baseline lesson] [--synthetic N] [--check] [--epoch] [--profile F]
                                                 the training step's images/s, time breakdown, FLOP/s vs the lesson
    distvit bench decode [--stored-size 224]     PNG vs JPEG decoding per core, raw decoders, the lesson
    distvit bench preflight [--shards N]         start-up shard hashing: serial, parallel, requeue
    distvit surgery --config FILE [key=value ...]   the model surgery plan: tokens, params, FLOPs, memory
    distvit evaluate RUN_DIR|CHECKPOINT [--split test]   exact accuracy, per class, confusion matrix
    distvit predict --checkpoint RUN_DIR img.png ...     top-k classes (or --model NAME --pretrained)
    distvit doctor [--run-dir DIR]               ranks, rendezvous, all-reduce, run directory, GPUs, W&B
    distvit report RUN_DIR                       redraw the run's PNG plots
    distvit train --config FILE [key=value ...]  train in this process (same as distvit/train.py)
    distvit sweep run SWEEP_FILE|SWEEP_DIR [key=value ...] [--processes N]   a worker of a sweep: pulls trials
    distvit sweep report SWEEP_DIR               the sweep's table, plots and best.yaml

Multi-process training goes through Accelerate: `accelerate launch distvit/train.py --config FILE`.
Input errors (`DistvitError`) print one actionable message and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from distvit.data.node import is_local_leader, launch
from distvit.errors import ConfigError, DistvitError, PeerFailure, RunFinished
from distvit.tools import bench_commands, prepare
from distvit.tools.preflight import add_config_arguments, load_checked_config


def run_guarded(action: Callable[[], int | None], stop_signals: bool = False) -> int:
    """Run a command's action; a DistvitError is its one line and exit status. `stop_signals` (training):
    SIGTERM, SIGUSR1 and SIGINT are stop requests from here to the process's end (distvit.engine.signals)."""
    from distvit.engine import signals  # the standard library only

    if stop_signals:
        signals.install()
    try:
        try:
            return action() or 0
        finally:  # the process ends now: a request is only noted (no start-up stop raised into the report)
            signals.enter(signals.END)
    except signals.StoppedDuringStartup as stop:  # nothing trained yet, nothing to checkpoint
        return signals.report_startup_stop(stop)
    except RunFinished as done:  # a requeued job whose run already ended: success, nothing to redo
        if is_local_leader():
            print(f"distvit: {done}", file=sys.stderr, flush=True)
        return 0
    except PeerFailure as err:  # every rank that notices says so: which one failed differs by rank
        print(f"distvit: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except DistvitError as err:
        if is_local_leader():
            print(f"distvit: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code


def _train(args: argparse.Namespace) -> int:
    cfg, manifest, bad_shards = load_checked_config(args.config, args.overrides)
    from distvit.engine.stopping import EXIT_STOPPED, PLANNED_STOP
    from distvit.engine.trainer import run_training  # Accelerate starts here, after every input check passed

    summary = run_training(cfg, manifest, bad_shards)
    requested_stop = not summary["finished"] and summary["stop_reason"] != PLANNED_STOP
    return EXIT_STOPPED if requested_stop else 0


def _config(args: argparse.Namespace) -> int:
    if args.get:  # one resolved value, for scripts (the Slurm scripts ask for run.dir): the config alone
        from distvit.config import MOVED_KEYS, load_config

        cfg = load_config(args.config, args.overrides)
        section, _, key = args.get.partition(".")
        values = cfg.to_dict()
        if args.get in MOVED_KEYS:
            raise ConfigError(f"--get {args.get}: `{args.get}` moved to `{MOVED_KEYS[args.get]}`; ask for that.")
        if section not in values or key not in values[section]:
            raise ConfigError(f"--get {args.get}: not a config key (section.key, e.g. run.dir).")
        print(values[section][key])
        return 0
    cfg, manifest, _ = load_checked_config(args.config, args.overrides)
    from distvit.augment import recipe_of
    from distvit.augment.recipe import flip_warning

    recipe = recipe_of(cfg.augment)
    print(cfg.to_yaml(), end="")
    print(f"# augmentation: {recipe.describe()}")
    warning = flip_warning(recipe, manifest.flip_safe, cfg.data.path)
    if warning:
        print(f"distvit: {warning}", file=sys.stderr)
    return 0


def _surgery(args: argparse.Namespace) -> int:
    """Build the configured model on the CPU and print its surgery plan; trains nothing."""
    cfg, manifest, _ = load_checked_config(args.config, args.overrides)
    from distvit.model.build import build_model
    from distvit.model.plan_text import plan_report

    model, record = build_model(cfg.model, cfg.surgery, manifest.num_classes)
    print(plan_report(model, record, cfg.train.batch_size))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Exact evaluation of a checkpoint; run under `accelerate launch -m distvit.cli evaluate` for N ranks."""
    import json

    from distvit.fileio import atomic_write_bytes, check_output_file
    from distvit.tools.evaluate import evaluate_checkpoint, evaluation_json, format_evaluation

    if args.batch_size < 1:
        raise DistvitError(f"--batch-size must be positive, got {args.batch_size}.")
    if args.json:
        check_output_file(args.json, "--json")
    result, about = evaluate_checkpoint(args.source, args.data, args.split, args.weights, args.batch_size, args.mode)
    if launch().rank == 0:
        print(format_evaluation(result, about))
        if args.json:
            atomic_write_bytes(args.json, (json.dumps(evaluation_json(result, about), indent=1) + "\n").encode())
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from distvit.tools.predict import format_predictions, predict_checkpoint, predict_pretrained, predictions_to_json

    if bool(args.checkpoint) == bool(args.model):
        raise DistvitError(
            "pass either --checkpoint RUN_DIR_OR_FILE (a distvit model) "
            "or --model NAME --pretrained [PATH] (a timm model)."
        )
    if args.checkpoint:
        predictions = predict_checkpoint(
            args.checkpoint, args.images, top_k=args.top_k, weights=args.weights, device=args.device
        )
    else:
        pretrained = True if args.pretrained in (None, "hub") else args.pretrained
        predictions = predict_pretrained(
            args.model, args.images, pretrained=pretrained, top_k=args.top_k, device=args.device
        )
    print(json.dumps(predictions_to_json(predictions), indent=1) if args.json else format_predictions(predictions))
    return 0


def _report(args: argparse.Namespace) -> int:
    from distvit.run.plots import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from distvit.tools.doctor import run_doctor

    if args.timeout <= 0 or args.bandwidth_mb < 1:
        raise DistvitError("--timeout must be positive and --bandwidth-mb at least 1.")
    if args.rendezvous and (":" not in args.rendezvous or not args.rendezvous.rpartition(":")[2].isdigit()):
        raise DistvitError(f"--rendezvous must be HOST:PORT, got {args.rendezvous!r}.")
    return run_doctor(args.run_dir, args.timeout, args.bandwidth_mb, args.rendezvous)


def _add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """Every prepare subcommand's flags on how images are stored, and on what a flip does to them."""
    parser.add_argument(
        "--format",
        choices=("png", "jpeg"),
        default="png",
        help="how images are stored: png (lossless; small for CIFAR-sized images) or jpeg (photos: a quarter of "
        "the bytes, faster to decode, decodable on the GPU)",
    )
    parser.add_argument(
        "--quality", type=int, default=None, help="JPEG quality, 1..100 (only with --format jpeg; default 95)"
    )
    parser.add_argument(
        "--no-flip",
        action="store_true",
        help="horizontal flips change what these images mean (digits, text, many medical/industrial images): "
        'the manifest records "flip_safe": false',
    )


def _generated_source(sources, name: str, what: str, train_size: int, test_size: int) -> argparse.ArgumentParser:
    """`prepare synthetic|digits`: images generated offline, with their sizes, seed and the shared flags."""
    parser = sources.add_parser(name, help=f"{what} (offline)")
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--train-size", type=int, default=train_size)
    parser.add_argument("--test-size", type=int, default=test_size)
    parser.add_argument(
        "--image-size", type=int, default=32, help="image side in pixels, 8..16384, within the host's memory"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    _add_format_arguments(parser)
    return parser


def _add_prepare_commands(commands) -> None:
    prepare_parser = commands.add_parser("prepare", help="write a dataset as webdataset shards + manifest")
    sources = prepare_parser.add_subparsers(dest="source", required=True)
    synthetic = _generated_source(
        sources, "synthetic", "learnable synthetic images in CIFAR-10's shape", 50_000, 10_000
    )
    synthetic.add_argument("--num-classes", type=int, default=10)
    synthetic.set_defaults(action=prepare.synthetic_command)
    digits = _generated_source(
        sources,
        "digits",
        "digit glyphs 0..9 in random pose, weight, contrast and noise: a flip-unsafe proxy",
        1438,
        359,
    )
    digits.set_defaults(action=prepare.digits_command)
    cifar10 = sources.add_parser("cifar10", help="CIFAR-10 (python version): download, local archive or folder")
    cifar10.add_argument("--out", required=True, help="output dataset folder")
    cifar10.add_argument(
        "--source",
        default=None,
        help="cifar-10-python.tar.gz path or URL, or an extracted cifar-10-batches-py/ folder (default: download)",
    )
    cifar10.add_argument("--skip-checksum", action="store_true", help="use a source whose md5 is not the official one")
    cifar10.add_argument("--seed", type=int, default=0, help="seed of the order samples are written in")
    cifar10.add_argument("--samples-per-shard", type=int, default=5000)
    _add_format_arguments(cifar10)
    cifar10.set_defaults(action=prepare.cifar10_command)
    folder = sources.add_parser("imagefolder", help="a class_name/image.ext folder (optionally train/ val/ test/)")
    folder.add_argument("--source", required=True, help="folder of class folders (or of train/ and val/)")
    folder.add_argument("--out", required=True, help="output dataset folder")
    folder.add_argument(
        "--val-fraction", type=float, default=0.1, help="held-out share per class without val/ (default 0.1)"
    )
    folder.add_argument(
        "--image-size", type=int, default=None, help="resize + centre-crop to S x S (default: keep sizes)"
    )
    folder.add_argument("--strict", action="store_true", help="a file that is not a decodable image is an error")
    folder.add_argument("--seed", type=int, default=0, help="seed of the split and of the write order")
    folder.add_argument("--samples-per-shard", type=int, default=5000)
    _add_format_arguments(folder)
    folder.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    folder.set_defaults(action=prepare.imagefolder_command)


def _add_config_command(commands) -> None:
    config = commands.add_parser("config", help="validate a config and print it resolved")
    add_config_arguments(config)
    config.add_argument("--get", default=None, metavar="SECTION.KEY", help="print only this resolved value")
    config.set_defaults(action=_config)


def _add_model_commands(commands) -> None:
    """surgery (a config's model), evaluate and predict (a trained or timm model)."""
    surgery = commands.add_parser(
        "surgery", help="print the model surgery plan of a config: tokens, params, FLOPs, memory"
    )
    add_config_arguments(surgery)
    surgery.set_defaults(action=_surgery)

    evaluate = commands.add_parser(
        "evaluate", help="exact top-1/top-5, per-class accuracy and confusion matrix of a checkpoint (1..N ranks)"
    )
    evaluate.add_argument("source", help="a run directory (its final checkpoint) or a checkpoint file")
    evaluate.add_argument("--data", default=None, help="dataset folder (default: the one the run trained on)")
    evaluate.add_argument("--split", default=None, help="dataset split (default: the one the run evaluated on)")
    evaluate.add_argument("--weights", default="model", help="model (default) or ema")
    evaluate.add_argument("--batch-size", type=int, default=500, help="global batch size")
    evaluate.add_argument("--mode", default="auto", choices=["auto", "memory", "stream"], help="how the split is read")
    evaluate.add_argument("--json", default=None, help="also write the results as JSON here")
    evaluate.set_defaults(action=_evaluate)

    predict = commands.add_parser("predict", help="top-k classes of image files")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--checkpoint", default=None, help="a distvit run directory or checkpoint")
    predict.add_argument("--model", default=None, help="a timm model name (ImageNet classes), instead of --checkpoint")
    predict.add_argument(
        "--pretrained",
        nargs="?",
        const="hub",
        default=None,
        help="with --model: hub weights (no value) or a local weights file",
    )
    predict.add_argument("--weights", default="model", help="with --checkpoint: model (default) or ema")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(action=_predict)


def _add_run_commands(commands) -> None:
    """doctor (before a run), report (after one) and train."""
    doctor = commands.add_parser(
        "doctor",
        help="check ranks, rendezvous, all-reduce, run directory, versions, GPUs and W&B; run under the launcher",
    )
    doctor.add_argument(
        "--run-dir", default="runs/doctor", help="the run directory training will use (shared by all nodes)"
    )
    doctor.add_argument("--timeout", type=float, default=60.0, help="seconds for the rendezvous and each collective")
    doctor.add_argument("--bandwidth-mb", type=int, default=16, help="all-reduce size for the bandwidth estimate")
    doctor.add_argument("--rendezvous", default=None, help="HOST:PORT instead of MASTER_ADDR / MASTER_PORT")
    doctor.set_defaults(action=_doctor)

    report = commands.add_parser("report", help="redraw a run directory's PNG plots (loss, lr, accuracy, confusion)")
    report.add_argument("run_dir")
    report.set_defaults(action=_report)

    train = commands.add_parser("train", help="train in this process (use accelerate launch for several)")
    add_config_arguments(train)
    train.set_defaults(action=_train)


def _sweep_run(args: argparse.Namespace) -> int:
    from distvit.sweep.worker import run_worker

    return run_worker(
        args.source,
        args.overrides,
        directory=args.dir,
        processes=args.processes,
        gpus=args.gpus,
        port=args.port,
        name=args.name,
    )


def _sweep_report(args: argparse.Namespace) -> int:
    from distvit.sweep.report import sweep_report

    table, written = sweep_report(args.sweep_dir)
    print(table, end="")
    for path in written:
        print(path)
    return 0


def _add_sweep_commands(commands) -> None:
    sweep = commands.add_parser("sweep", help="hyperparameter sweeps: workers that pull trials, and the report")
    actions = sweep.add_subparsers(dest="sweep_command", required=True)
    run = actions.add_parser(
        "run",
        help="a worker: takes trials until the sweep's number of trials is met (start K of them, or a Slurm array)",
    )
    run.add_argument("source", help="a sweep file (configs/sweeps/*.yaml) or the folder of a sweep under way")
    run.add_argument("overrides", nargs="*", help="key=value changes to the sweep's base config (with a sweep file)")
    run.add_argument("--dir", default=None, help="the sweep folder (default: the sweep file's `dir`)")
    run.add_argument("--processes", type=int, default=1, help="processes per trial (accelerate launch when > 1)")
    run.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for this worker's trials (e.g. 0,1)")
    run.add_argument("--port", type=int, default=None, help="rendezvous port of multi-process trials")
    run.add_argument("--name", default=None, help="the worker's name: restarted with it, it resumes its own trial")
    run.set_defaults(action=_sweep_run)
    report = actions.add_parser("report", help="the sweep's table, plots (PNG) and best.yaml")
    report.add_argument("sweep_dir")
    report.set_defaults(action=_sweep_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distvit", description="Fine-tune Vision Transformers on 1..N GPUs or nodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prepare_commands(commands)  # the order of these calls is the order `distvit --help` lists the commands
    _add_config_command(commands)
    bench_commands.add_commands(commands)
    _add_model_commands(commands)
    _add_run_commands(commands)
    _add_sweep_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.action(args), stop_signals=args.command == "train")


def train_main(argv: list[str] | None = None) -> int:
    """Entry of `distvit/train.py`: the arguments of `distvit train`."""

    def train() -> int:
        parser = argparse.ArgumentParser(prog="distvit/train.py", description="Train (run under accelerate launch).")
        add_config_arguments(parser)
        return _train(parser.parse_args(argv))

    return run_guarded(train, stop_signals=True)


if __name__ == "__main__":
    sys.exit(main())
