"""Augmentation on data a flip changes: handwritten digits, five pipelines, several seeds, one table.

    python3 launch/augment_proxy.py [--data sklearn|generated] [--seeds 3] [--epochs 15] [--out DIR]

`--data sklearn` (the default where scikit-learn is installed): its 1,797 real handwritten digits (8 x 8,
packaged with it, nothing downloaded) upscaled to 32 x 32 and written as an image folder, imported the
way users import their own (`distvit prepare imagefolder --val-fraction 0.2 --no-flip`: 1,438 train /
359 val). `--data generated`: `distvit prepare digits` (drawn glyphs, harder: random pose and noise).
Trains the demo recipe (random-init deit_tiny at 32 px, patch 16, AdamW) with each pipeline and seed,
everything else equal, and prints a markdown table of the final accuracy (mean, min..max, every seed).
Repeats stay at 1 so that every pipeline trains the same number of steps. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINES = {
    "none": ["augment.preset=none"],
    "crop_flip (distvit's default)": ["augment.preset=crop_flip"],
    "padded crop, no flip (crop_flip with augment.hflip=0)": ["augment.preset=crop_flip", "augment.hflip=0"],
    "padded crop + RandAugment m9 + erasing 0.25, no flip": [
        "augment.preset=deit",
        "augment.crop=pad",
        "augment.hflip=0",
        "augment.repeats=1",
    ],
    "the same with flips (p=0.5)": ["augment.preset=deit", "augment.crop=pad", "augment.repeats=1"],
}


def _distvit(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distvit.cli", *args], cwd=REPO, capture_output=True, text=True)


def _sklearn_digits(folder: Path) -> None:
    """scikit-learn's digits as 32 x 32 PNGs in class folders (bilinear upscaling of the 0..16 levels)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray((pixels * (255 / 16)).round().astype("uint8")).resize((32, 32), Image.BILINEAR)
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(folder / str(label) / f"{index:04d}.png")


def _prepare(kind: str, root: Path, train_size: int, test_size: int) -> tuple[Path, str] | None:
    """The dataset folder and its evaluation split, or None (the error printed)."""
    data = root / f"digits-{kind}"
    if kind == "sklearn":
        _sklearn_digits(root / "digits-source")
        command = ["prepare", "imagefolder", "--source", str(root / "digits-source"), "--out", str(data)]
        prepared = _distvit([*command, "--val-fraction", "0.2", "--no-flip"])
    else:
        sizes = ["--train-size", str(train_size), "--test-size", str(test_size)]
        prepared = _distvit(["prepare", "digits", "--out", str(data), *sizes])
    if prepared.returncode:
        print(prepared.stderr, file=sys.stderr)
        return None
    return data, "val" if kind == "sklearn" else "test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    try:
        import sklearn  # noqa: F401
    except ImportError:
        default = "generated"
    else:
        default = "sklearn"
    parser.add_argument("--data", choices=["sklearn", "generated"], default=default)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-size", type=int, default=1438)
    parser.add_argument("--test-size", type=int, default=359)
    parser.add_argument("--out", help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--only", type=int, nargs="*", help="run only these pipelines (0-based, in the table's order)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        prepared = _prepare(args.data, root, args.train_size, args.test_size)
        if prepared is None:
            return 1
        data, eval_split = prepared
        rows = []
        for index, (name, overrides) in enumerate(PIPELINES.items()):
            if args.only is not None and index not in args.only:
                continue
            accuracies = []
            for seed in range(args.seeds):
                run_dir = root / "runs" / f"{index}-seed{seed}"
                result = _distvit(
                    [
                        "train",
                        "--config",
                        "configs/demo.yaml",
                        f"data.path={data}",
                        f"data.eval_split={eval_split}",
                        f"run.dir={run_dir}",
                        f"train.epochs={args.epochs}",
                        f"train.seed={seed}",
                        "tracking.backend=none",
                        *overrides,
                    ]
                )
                if result.returncode:
                    print(result.stderr[-3000:], file=sys.stderr)
                    return 1
                final = json.loads((run_dir / "summary.json").read_text())["final"]
                accuracies.append(final["accuracy"])
            rows.append((name, accuracies))
            print(f"{name}: {', '.join(f'{a:.3f}' for a in accuracies)}", file=sys.stderr)
    title = f"pipeline ({args.data} digits, {args.epochs} epochs, {args.seeds} seeds)"
    print(f"| {title} | mean accuracy | min..max | per seed |")
    print("| --- | --- | --- | --- |")
    for name, accuracies in rows:
        spread = f"{min(accuracies):.3f}..{max(accuracies):.3f}"
        seeds = ", ".join(f"{a:.3f}" for a in accuracies)
        print(f"| {name} | {statistics.mean(accuracies):.3f} | {spread} | {seeds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
