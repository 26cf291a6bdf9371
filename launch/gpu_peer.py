"""The peer phase of launch/gpu_check.py: timm's own `benchmark.py` and `train.py`, measured in the same
run on the same device, beside distvit's rows (issue 23, part 1).

timm's scripts are not in its pip package and nothing of timm's code is committed here: fetch them into
the git-ignored launch/peer/timm/ first (`bash launch/get_timm_scripts.sh [TIMM_GIT_DIR_OR_URL] [REF]`)
and carry that folder to the device machine (`carry: ["launch/peer"]`). Without it the phases are
skipped, said so. In order of importance:

1. timm `benchmark.py --bench train` (random input on the device, no data at all: the ceiling a user
   could get from timm) for deit_tiny 224/p16, deit_tiny 32/p4 and deit_small 224/p16: bf16 AMP,
   `--torchcompile`, AdamW with torch's fused kernel (benchmark.py passes only `opt` and `lr` to timm's
   optimizer factory, so its run is wrapped to ask the factory for `fused=True`; the wrapper prints what
   it built), 10 classes, the batch of distvit's row;
2. timm `train.py` end to end on an image folder of 20,000 CIFAR-size PNGs (distvit's synthetic images,
   the same seed as `bench train --synthetic`) and 1,000 for validation, upscaled to 224 by timm's own
   transforms (random resized crop and flip, colour jitter off: the augmentation distvit's bench does),
   bf16 AMP, `--torchcompile`, fused AdamW, every host core a loader worker, batch 512; its img/s is
   timm's own per-step rate (data wait included) over the last epoch (two when the budget allows: the
   first pays for compiling).
3. The side-by-side table: distvit's whole step (data included) >= timm's data-free step in all three
   cases, and >= 3x timm's train.py end to end at 224.

`--quick` (gpu_check.py's) runs tiny sizes on any device (fp32 and eager on a CPU, 32 px, batch 8) to
check the phase itself with the real scripts. `python3 gpu_peer.py --run-timm SCRIPT ARGS` runs one of
timm's scripts as its own __main__ with the fused-AdamW wrapper.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO / "launch" / "peer" / "timm"
BENCH = "timm benchmark.py (peer)"
TRAIN = "timm train.py (peer)"
PHASES = (BENCH, TRAIN)
LONGEST = {BENCH: 240, TRAIN: 170}  # seconds each phase may take (gpu_check.py's budget cuts them further)
BENCH_LONGEST_EACH = 100  # one benchmark.py run: start-up, compile (~30 s on an H100), 50 steps
# distvit's case, timm model, its keyword arguments, image size: the three cases benchmark.py runs
MODELS = [
    ("deit_tiny 224/p16", "deit_tiny_patch16_224", [], 224),
    ("deit_tiny 32/p4", "deit_tiny_patch16_224", ["img_size=32", "patch_size=4"], 32),
    ("deit_small 224/p16", "deit_small_patch16_224", [], 224),
]
TRAIN_CASE = "deit_tiny 224/p16"  # distvit's row that timm's train.py stands beside
TRAIN_IMAGES, VAL_IMAGES, TRAIN_BATCH = 20_000, 1_000, 512
MIN_TWO_EPOCHS_S = 100  # with less left, train.py runs one epoch (its steps after the first few timed)
TARGETS = {BENCH: 1.0, TRAIN: 3.0}  # distvit's img/s over timm's, at least
NUM_CLASSES = 10
FUSED_MARK = "gpu_peer: optimizer "
HOW_TO_GET = (
    "timm's scripts are not in launch/peer/timm (git-ignored): run `bash launch/get_timm_scripts.sh "
    "[TIMM_GIT_DIR_OR_URL]`, and on the device machine carry launch/peer"
)
Runner = Callable[[list, float, Path], subprocess.CompletedProcess]


# ------------------------------------------------------------------------------------------- the scripts
def missing() -> str | None:
    """Why the peer phase cannot run here, or None."""
    if not all((PEER_DIR / name).is_file() for name in ("benchmark.py", "train.py")):
        return HOW_TO_GET
    return None


def source() -> dict:
    """launch/peer/timm/SOURCE.txt (written by get_timm_scripts.sh), with each file's sha256 checked."""
    info: dict = {}
    path = PEER_DIR / "SOURCE.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        key, _, value = line.partition(": ")
        info[key.strip()] = value.strip()
    changed = []
    for name in ("train.py", "benchmark.py"):
        recorded = info.get(f"sha256 {name}")
        digest = hashlib.sha256((PEER_DIR / name).read_bytes()).hexdigest() if (PEER_DIR / name).exists() else ""
        if recorded != digest:
            changed.append(name)
    info["files_as_copied"] = not changed
    if changed:
        info["changed"] = changed
    return info


def run_timm(script: str, args: list[str]) -> None:
    """One of timm's scripts as its own __main__, with timm's optimizer factory asked for torch's fused
    AdamW kernel (a setting the script gave itself wins) and what it built printed."""
    import runpy

    import timm.optim

    create = timm.optim.create_optimizer_v2

    def create_fused(*a, **kw):
        if str(kw.get("opt", a[1] if len(a) > 1 else "")).lower() == "adamw":
            kw.setdefault("fused", True)
        optimizer = create(*a, **kw)
        print(f"{FUSED_MARK}{type(optimizer).__name__} fused={optimizer.defaults.get('fused')}", flush=True)
        return optimizer

    timm.optim.create_optimizer_v2 = create_fused
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fused(output: str) -> bool | None:
    found = re.findall(re.escape(FUSED_MARK) + r"\S+ fused=(\w+)", output)
    return None if not found else found[-1] == "True"


def _precision_flags(device: str, quick: bool) -> tuple[list[str], str]:
    flags = ["--amp", "--amp-dtype", "bfloat16"] if device == "cuda" else []
    if not quick:
        flags.append("--torchcompile")
    return flags, ("bf16 AMP" if flags[:1] else "fp32") + (", compiled" if not quick else ", eager")


# ------------------------------------------------------------------------------------------- the parsers
def parse_benchmark(output: str, results_json: str | None = None) -> dict:
    """benchmark.py's result (its --results-file JSON, else the JSON it prints after `--result`):
    images/s, ms/step, batch, image size; ValueError when there is none or it reports an error."""
    result = None
    if results_json:
        try:
            result = json.loads(results_json)
        except json.JSONDecodeError:
            result = None
    if result is None:
        at = output.rfind("--result\n")
        if at < 0:
            raise ValueError("benchmark.py printed no result")
        try:
            result, _ = json.JSONDecoder().raw_decode(output[at + len("--result\n") :].lstrip())
        except json.JSONDecodeError as err:
            raise ValueError(f"benchmark.py's result is not JSON: {err}") from None
    if isinstance(result, list):  # a model list gives a list of results
        result = result[0] if len(result) == 1 else None
    if not isinstance(result, dict):
        raise ValueError("benchmark.py's result is not one model's")
    if "error" in result:
        raise ValueError(f"benchmark.py: {result['error'][:300]}")
    rate = result.get("train_samples_per_sec")
    if not isinstance(rate, (int, float)) or rate <= 0:
        raise ValueError(f"benchmark.py's result has no train_samples_per_sec: {sorted(result)}")
    return {
        "model": result.get("model"),
        "images_per_sec": float(rate),
        "step_ms": float(result.get("train_step_time", 0.0)),
        "batch_size": result.get("train_batch_size"),
        "img_size": result.get("train_img_size"),
    }


TRAIN_LINE = re.compile(
    r"Train: (?P<epoch>\d+) \[\s*(?P<step>\d+)/(?P<steps>\d+) .*?Time: (?P<seconds>[\d.]+)s,\s*(?P<rate>[\d.]+)/s"
)


def parse_train_log(output: str, batch_size: int, skip: int) -> dict:
    """timm train.py's per-step lines (`--log-interval 1`: each line's rate is that step's, data wait
    included): images/s over the last epoch when there are two or more, else over the first epoch's steps
    after the first `skip` (compiling, the loader starting); ValueError when nothing is left to time."""
    steps = [
        (int(m["epoch"]), int(m["step"]), int(m["steps"]), float(m["seconds"]), float(m["rate"]))
        for m in TRAIN_LINE.finditer(output)
    ]
    if not steps:
        raise ValueError("train.py logged no training step")
    epochs = sorted({s[0] for s in steps})
    last = epochs[-1]
    if len(epochs) > 1 and any(s[0] == last and s[1] + 1 == s[2] for s in steps):  # a whole last epoch
        timed = [s for s in steps if s[0] == last]
        what = f"epoch {last}"
    else:
        timed = [s for s in steps if s[0] == epochs[0] and s[1] >= skip]
        what = f"epoch {epochs[0]}, steps {skip}+"
    if not timed:
        raise ValueError(f"train.py logged {len(steps)} steps, none after the first {skip}")
    # each step's time from its rate (7 significant digits) rather than its 3-decimal seconds
    seconds = sum(batch_size / s[4] if s[4] > 0 else s[3] for s in timed)
    return {
        "images_per_sec": batch_size * len(timed) / seconds,
        "steps_timed": len(timed),
        "images_timed": batch_size * len(timed),
        "seconds_timed": seconds,
        "timed": what,
        "epochs_logged": len(epochs),
        "steps_logged": len(steps),
    }


def parse_top1(output: str) -> float | None:
    """The validation top-1 of train.py's final `--result` JSON, if it printed one."""
    at = output.rfind("--result\n")
    try:
        result, _ = json.JSONDecoder().raw_decode(output[at + len("--result\n") :].lstrip()) if at >= 0 else (0, 0)
        return float(result[-1]["validation"]["top1"])
    except (json.JSONDecodeError, LookupError, TypeError, ValueError):
        return None


# -------------------------------------------------------------------------------------------- the phases
def run_phase(
    name: str, cases: list[dict], specs: list[tuple], timeout: float, out: Path, scratch: Path, quick: bool, run: Runner
) -> dict:
    """One peer phase (BENCH or TRAIN) for gpu_check.py, after `cases` ran from its CASES `specs`;
    `run(command, timeout, out)` is its runner (it logs to gpu_check.log). The batch is distvit's where its
    case ran, else its case's `train.batch_size`."""
    reason = missing()
    if reason:
        return {"name": name, "skipped": reason}
    batches = {s[0]: int(o.split("=")[1]) for s in specs for o in s[2] if o.startswith("train.batch_size=")}
    batches |= {c["name"]: c["results"][0]["batch_size"] for c in cases if "results" in c}
    if name == BENCH:
        return run_benchmarks(batches, timeout, out, scratch, quick, run)
    return run_train(batches.get(TRAIN_CASE, TRAIN_BATCH), timeout, out, scratch, quick, run)


def run_benchmarks(batches: dict, timeout: float, out: Path, scratch: Path, quick: bool, run: Runner) -> dict:
    end = time.time() + timeout
    device = _device()
    precision, described = _precision_flags(device, quick)
    rows = []
    for case, model, kwargs, img_size in MODELS:
        batch = 8 if quick else batches.get(case, 512)
        if quick and img_size != 32:  # tiny sizes: the 224 px cases at 32 px, their patch size kept
            kwargs, img_size = ["img_size=32"], 32
        left = min(BENCH_LONGEST_EACH, end - time.time())
        if left < (5 if quick else 40):
            rows.append({"case": case, "skipped": "the phase's time was used up"})
            continue
        results = scratch / f"timm-bench-{len(rows)}.json"
        results.unlink(missing_ok=True)
        args = ["--bench", "train", "--model", model, "--img-size", str(img_size), "-b", str(batch)]
        args += ["--model-kwargs", *kwargs] if kwargs else []
        args += ["--num-classes", str(NUM_CLASSES), "--opt", "adamw", "--device", device, "--no-retry", *precision]
        args += ["--num-warm-iter", "1", "--num-bench-iter", "5"] if quick else ["--num-warm-iter", "10"]
        args += ["--results-file", str(results), "--results-format", "json"]
        start = time.perf_counter()
        completed = run([sys.executable, __file__, "--run-timm", str(PEER_DIR / "benchmark.py"), *args], left, out)
        output = completed.stdout + completed.stderr
        row = {"case": case, "model": model, "img_size": img_size, "batch_size": batch, "precision": described}
        row |= {"fused_adamw": _fused(output), "seconds": time.perf_counter() - start}
        row["command"] = "benchmark.py " + " ".join(args[: args.index("--results-file")])
        try:
            row |= parse_benchmark(output, results.read_text() if results.exists() else None)
            if row["batch_size"] != batch:
                row["error"] = f"benchmark.py ran batch {row['batch_size']}, not {batch}"
        except ValueError as err:
            last = output.strip().splitlines()[-1:] or [""]
            row["error"] = f"exit {completed.returncode}: {err}; {last[0][:200]}"
        rows.append(row)
    failed = [f"{r['case']}: {r['error']}" for r in rows if "error" in r]
    phase = {"name": BENCH, "exit": 1 if failed else 0, "device": device, "source": source(), "rows": rows}
    return phase | ({"error": "; ".join(failed)} if failed else {})


def write_image_folder(root: Path, train_images: int, val_images: int) -> None:
    """distvit's synthetic CIFAR-size images (train: the seed `bench train --synthetic` uses) as PNGs in
    class folders under root/train and root/validation, the layout timm's ImageFolder reader takes."""
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from distvit.data.prepare.synthetic import CLASS_NAMES, generate

    for split, size, seed in (("train", train_images, 0), ("validation", val_images, 1)):
        images, labels = generate(size, NUM_CLASSES, 32, seed=seed)
        for label in range(NUM_CLASSES):
            (root / split / CLASS_NAMES[label]).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(root / split / CLASS_NAMES[label] / f"{i:05d}.png", compress_level=1)


def run_train(batch: int, timeout: float, out: Path, scratch: Path, quick: bool, run: Runner) -> dict:
    end = time.time() + timeout
    device = _device()
    precision, described = _precision_flags(device, quick)
    train_images, val_images = (64, 16) if quick else (TRAIN_IMAGES, VAL_IMAGES)
    batch = 8 if quick else batch
    workers = min(2, _cores()) if quick else _cores()
    data = scratch / "timm-imagefolder"
    start = time.perf_counter()
    write_image_folder(data, train_images, val_images)
    written_s = time.perf_counter() - start
    epochs = 1 if quick or end - time.time() < MIN_TWO_EPOCHS_S else 2
    size = ["--model-kwargs", "img_size=32", "--img-size", "32"] if quick else ["--img-size", "224"]
    args = ["--data-dir", str(data), "--model", "deit_tiny_patch16_224", *size, "--num-classes", str(NUM_CLASSES)]
    args += ["-b", str(batch), "--epochs", str(epochs), "--val-interval", str(epochs), "--opt", "adamw"]
    args += ["--opt-kwargs", "fused=True", "--color-jitter", "0", "-j", str(workers), "--pin-mem"]
    args += ["--device", device, *precision, "--log-interval", "1", "--checkpoint-hist", "1"]
    args += ["--output", str(scratch / "timm-train"), "--experiment", "peer"]
    start = time.perf_counter()
    script = str(PEER_DIR / "train.py")
    completed = run([sys.executable, __file__, "--run-timm", script, *args], max(1.0, end - time.time()), out)
    output = completed.stdout + completed.stderr
    phase = {"name": TRAIN, "exit": completed.returncode, "device": device, "precision": described}
    phase |= {"batch_size": batch, "workers": workers, "epochs": epochs, "train_images": train_images}
    phase |= {"fused_adamw": _fused(output), "write_seconds": written_s, "wall_s": time.perf_counter() - start}
    phase |= {"val_top1": parse_top1(output), "source": source()}
    phase["command"] = "train.py " + " ".join(args).replace(str(scratch) + "/", "")
    try:
        phase |= parse_train_log(output, batch, skip=1 if quick else 3)
    except ValueError as err:
        last = output.strip().splitlines()[-1:] or [""]
        return phase | {"error": f"exit {completed.returncode}: {err}; {last[0][:200]}"}
    if completed.returncode != 0:  # timed out or failed after some steps: their rate stays, marked
        phase["error"] = f"exit {completed.returncode} after {phase['steps_logged']} steps"
    return phase


# -------------------------------------------------------------------------------------------- the report
def order(cases: list[tuple], peer: bool) -> list[tuple]:
    """gpu_check.py's CASES (name, config, overrides, flags, longest) in the order they run: with the
    peer, right after distvit's two deit_tiny cases come deit_small 224/p16 (the third case the peer
    stands beside), timm's benchmark.py and train.py, then the rest."""
    if not peer:
        return list(cases)
    first = list(cases[:2]) + [c for c in cases[2:] if c[0] == "deit_small 224/p16"]
    peers = [(name, "", [], [], LONGEST[name]) for name in PHASES]
    return first + peers + [c for c in cases if c not in first]


def verdict(distvit: float | None, timm: float | None, target: float) -> tuple[str, str]:
    """(distvit / timm as text, 'met' or 'MISSED' against the target ratio); '-' where one side is
    missing."""
    if not distvit or not timm:
        return "-", "not measured"
    ratio = distvit / timm
    return f"{ratio:.2f}x", "met" if ratio >= target else "MISSED"


def side_by_side(cases: list[dict]) -> list[str]:
    """The markdown section: distvit's rows beside timm's, each ratio against its target."""
    by_name = {c["name"]: c for c in cases}
    bench, train = by_name.get(BENCH), by_name.get(TRAIN)
    if bench is None and train is None:
        return []
    lines = ["## Side by side with timm", ""]
    skips = [f"- {p['name']}: skipped: {p['skipped']}" for p in (bench, train) if p and "skipped" in p]
    ran = [p for p in (bench, train) if p and "skipped" not in p]
    if not ran:
        return lines + skips
    src = ran[0].get("source", {})
    lines.append(
        f"timm's own scripts (launch/peer/timm: {src.get('ref', '?')} {src.get('commit', '?')[:12]}, timm "
        f"{src.get('timm version at the commit', '?')} there"
        f"{'' if src.get('files_as_copied') else '; CHANGED since copied: ' + ', '.join(src.get('changed', []))}"
        f"), run on the same device in this run. distvit: `bench train`'s whole step, data included."
    )
    if ran[0].get("device") == "cpu":
        lines.append("On a CPU (--quick): tiny sizes; the verdicts check the script, the targets are for a GPU.")
    lines += [
        "",
        "| case | distvit img/s | distvit precision, batch | timm | timm img/s | timm precision, batch | "
        "distvit / timm | target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def distvit_row(name: str) -> tuple[float | None, str]:
        case = by_name.get(name)
        if not case or "results" not in case:
            why = "not run" if not case else case.get("skipped") or case.get("error", "")
            return None, f"- ({why[:60]})"
        m = case["results"][0]
        precision = {"no": "fp32"}.get(case["mixed_precision"], case["mixed_precision"])
        return m["images_per_sec"], f"{precision}, {m['batch_size']}"

    rows = [
        (r["case"], "benchmark.py --bench train (no data)", r, TARGETS[BENCH]) for r in (bench or {}).get("rows", [])
    ]
    if train:
        rows.append((TRAIN_CASE, f"train.py end to end ({train.get('train_images', 0):,} PNGs)", train, TARGETS[TRAIN]))
    for case, what, peer, target in rows:
        rate, described = distvit_row(case)
        timm = peer.get("images_per_sec")
        fused = {True: ", fused AdamW", False: ", AdamW (not fused)"}.get(peer.get("fused_adamw"), "")
        timm_text = f"{timm:,.0f}" if timm else ("skipped" if "skipped" in peer else "FAILED")
        ratio, mark = verdict(rate, timm, target)
        rows_text = f"{rate:,.0f}" if rate else "-"
        lines.append(
            f"| {case} | {rows_text} | {described} | {what} | {timm_text} | "
            f"{peer.get('precision', '-')}{fused}, {peer.get('batch_size', '-')} | {ratio} | >= {target:g}x | "
            f"{mark} |"
        )
    lines += ["", *skips]
    for row in (bench or {}).get("rows", []):
        if "error" in row or "skipped" in row:
            lines.append(f"- benchmark.py, {row['case']}: {row.get('error') or 'skipped: ' + row['skipped']}")
        else:
            lines.append(f"- benchmark.py, {row['case']}: {row['step_ms']:.1f} ms/step; `{row['command']}`")
    if train:
        if "images_per_sec" in train:
            lines.append(
                f"- train.py: {train['images_per_sec']:,.0f} img/s over {train['timed']} ({train['steps_timed']} "
                f"steps, timm's per-step rates, data wait included), {train['workers']} loader workers, "
                f"{train['wall_s']:.0f} s from launch to exit (compiling and validation included); `{train['command']}`"
            )
        if "error" in train:
            lines.append(f"- train.py: FAILED: {train['error']}")
    return lines


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--run-timm":
        run_timm(sys.argv[2], sys.argv[3:])
    else:
        sys.exit("usage: gpu_peer.py --run-timm SCRIPT ARGS (the phases run inside launch/gpu_check.py)")
