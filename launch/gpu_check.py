"""GPU check of distvit, one command, nothing downloaded (about 9 minutes on one H100 or H200):

    python3 launch/gpu_check.py OUT_DIR [--budget SECONDS]

Needs torch, torchvision, timm and accelerate; the phases that read shards also need webdataset, the
augmentation phase kornia (carry the wheels of webdataset and braceexpand, kornia and kornia_rs where
they are missing; without them those phases are skipped, said so in the table).
The images are the built-in synthetic CIFAR-format data; the models are random-init timm DeiTs (speed
does not depend on the weights). In order of importance, each phase within what is left of the budget:

1. deit_tiny 224/p16, `distvit bench train --check --profile` against the lesson's loop in the same
   process: the fast path (bf16, compile, fused kernels, device-side data) and an fp32 eager reference
   first train side by side from the same weights on the same batches and must agree within bf16
   tolerance; a torch.profiler summary of a few steps (top kernels, the device's busy share) is kept;
2. deit_tiny 32/p4 (profiled too);
3. the CUDA-only paths with 1 and 2 ranks on the GPU (`launch/gpu_paths.py`: compile + DDP +
   accumulation without recompiles, 1 vs 2 ranks, exact resume in bf16, fp16 overflow and scaler
   resume, evaluation counts on 1 and 2 ranks);
4. the data readers (`distvit bench data` at 32 px and 224 px: the lesson's pipeline, memory, stream);
5. decoding at 224 px stored size (`distvit bench decode`: raw decoders, PNG and JPEG shards in 0, 1 and
   all-core workers, JPEG decoded in batches on the GPU), against the >= 25k img/s target; deit_tiny at
   224 px with DeiT's augmentation on the device, its share of the step against the < 5 % target;
6. the lesson's first experiment end to end (10k images, 1 epoch, head only at 224 px, batch 64,
   feature pass included) against the lesson's loop;
7. deit_tiny 32/p16 and deit_small 224/p16.

With --peer (the default without --quick), deit_small 224/p16 and timm's own benchmark.py and train.py
(launch/gpu_peer.py; launch/get_timm_scripts.sh fetches them) run right after 2.

Writes OUT_DIR/gpu_check.md (the table, hardware and versions, the targets marked met or missed),
gpu_check.json, gpu_check.log, gpu_profiles.txt and gpu_paths.{md,json,log}; exits 1 if a check fails
or a run breaks. `--quick` runs tiny sizes (any machine, CPU included) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gpu_peer

REPO = Path(__file__).resolve().parents[1]

HEAD_ONLY = "lesson exp. 1: head only 224"
PATHS = "CUDA paths (gpu_paths.py)"
READERS = "data readers (bench data)"
DECODE = "decoding at 224 px (bench decode)"
AUGMENTED = "deit_tiny 224/p16, DeiT augmentation"
MAX_AUGMENT_FRACTION = 0.05  # the augmentation issue: DeiT's pipeline < 5 % of the step at batch 512
DEVICE_DECODE_TARGET = 25_000  # img/s from JPEG shards at 224 px on one H100 (the streaming issue)
# name, config, overrides (random init), extra bench flags, longest time the case may take (s); in the
# order they run: what matters most first, so a short budget cuts the least important
CASES = [
    # no warmup: the check's steps train at the full lr, so a wrong weight update shows
    (
        "deit_tiny 224/p16",
        "configs/demo.yaml",
        ["surgery.img_size=224", "train.batch_size=512", "optim.warmup_epochs=0"],
        ["--check", "--profile"],
        150,
    ),
    (
        "deit_tiny 32/p4",
        "configs/demo.yaml",
        ["surgery.img_size=32", "surgery.patch_size=4", "train.batch_size=1024"],
        ["--profile"],
        100,
    ),
    (PATHS, "", [], [], 150),
    (READERS, "", [], [], 60),
    (DECODE, "", [], [], 90),
    (AUGMENTED, "configs/demo.yaml", ["surgery.img_size=224", "train.batch_size=512", "augment.preset=deit"], [], 80),
    # the lesson's recipe as distvit runs it (its precision, cached features) against the lesson's loop
    (
        HEAD_ONLY,
        "configs/lesson_head_only_224.yaml",
        ["model.pretrained=false", "train.mixed_precision=auto"],
        ["--epoch", "--synthetic", "10000"],
        70,
    ),
    ("deit_tiny 32/p16", "configs/demo.yaml", ["surgery.img_size=32", "train.batch_size=1024"], [], 80),
    (
        "deit_small 224/p16",
        "configs/demo.yaml",
        ["model.name=deit_small_patch16_224", "surgery.img_size=224", "train.batch_size=512"],
        [],
        100,
    ),
]
QUICK = ["surgery.img_size=32", "train.batch_size=16", "train.compile=false", "data.train_subset=0"]  # last: wins
TARGETS = {  # case: (min images/s, min x lesson), from the speed issue (H100, bf16)
    "deit_tiny 224/p16": (12_000, 10.0),
    "deit_tiny 32/p4": (40_000, None),
}
MAX_DATA_FRACTION = 0.02
MIN_CASE_S = 40  # a case given less than this is skipped, not started


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _run(command: list[str], timeout: float, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        completed = subprocess.CompletedProcess(
            command, "timeout", _text(err.stdout), _text(err.stderr) + f"\ntimed out after {timeout:.0f} s"
        )
    with open(out / "gpu_check.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n{completed.stdout}{completed.stderr}\n")
    print(completed.stdout, flush=True)
    return completed


def run_case(
    name: str,
    config: str,
    overrides: list[str],
    flags: list[str],
    timeout: float,
    out: Path,
    scratch: Path,
    quick: bool,
) -> dict:
    slug = _slug(name)
    result_file = scratch / f"{slug}.json"
    profile = scratch / f"{slug}.profile.txt"
    sizes = ["--synthetic", "20000", "--steps", "30", "--warmup", "6"]
    if quick:
        sizes = ["--synthetic", "200", "--steps", "2", "--warmup", "1"]
    if "--synthetic" in flags:  # the case's own data size (--synthetic is read once: the case's wins)
        at = flags.index("--synthetic")
        sizes = [*sizes, *(flags[at : at + 2] if not quick else [])]
        flags = flags[:at] + flags[at + 2 :]
    flags = [f for flag in flags for f in ([flag, str(profile)] if flag == "--profile" else [flag])]
    command = [sys.executable, "-m", "distvit.cli", "bench", "train", "--config", config, "--baseline", "lesson"]
    command += ["--run-dir", str(scratch / slug), "--json", str(result_file), *sizes, *flags]
    command += [*overrides, *(QUICK if quick else [])]
    start = time.perf_counter()
    completed = _run(command, timeout, out)
    if profile.exists():
        with open(out / "gpu_profiles.txt", "a") as profiles:
            profiles.write(f"## {name}\n\n{profile.read_text()}\n\n")
    if not result_file.exists():
        last = completed.stderr.strip().splitlines()[-1:] or [""]
        return {"name": name, "error": f"exit {completed.returncode}: {last[0][:300]}"}
    return {
        "name": name,
        "wall_s": time.perf_counter() - start,
        "exit": completed.returncode,
        **json.loads(result_file.read_text()),
    }


def run_readers(timeout: float, out: Path, scratch: Path, quick: bool) -> dict:
    """`distvit bench data` at 32 px (batch 256) and 224 px (batch 128): the lesson's pipeline, memory
    mode and stream mode (shards decoded in 2 workers) on the synthetic demo data."""
    try:
        import webdataset  # noqa: F401 - the readers read shards
    except ImportError:
        return {"name": READERS, "skipped": "webdataset is not installed (carry its wheel and braceexpand's)"}
    end = time.time() + timeout
    data = scratch / "readers-data"
    sizes = ["--train-size", "1000", "--test-size", "100"] if quick else ["--train-size", "5000", "--test-size", "1000"]
    prepared = _run(
        [sys.executable, "-m", "distvit.cli", "prepare", "synthetic", "--out", str(data), *sizes], timeout, out
    )
    if prepared.returncode:
        return {"name": READERS, "error": f"prepare exit {prepared.returncode}"}
    results = {}
    for label, flags in (
        ("32 px, batch 256", ["--batch-size", "256", "--steps", "4" if quick else "40"]),
        ("224 px, batch 128", ["--img-size", "224", "--batch-size", "128", "--steps", "2" if quick else "20"]),
    ):
        json_file = scratch / f"readers-{len(results)}.json"
        command = [sys.executable, "-m", "distvit.cli", "bench", "data", "--data", str(data), *flags]
        completed = _run([*command, "--json", str(json_file)], max(1.0, end - time.time()), out)
        if completed.returncode or not json_file.exists():
            return {"name": READERS, "error": f"{label}: exit {completed.returncode}", "readers": results}
        results[label] = json.loads(json_file.read_text())
    return {"name": READERS, "exit": 0, "readers": results}


def run_decode(timeout: float, out: Path, scratch: Path, quick: bool) -> dict:
    """`distvit bench decode` on this machine's device: batches large enough that a GPU's rate is timed
    over more than a moment."""
    try:
        import webdataset  # noqa: F401 - the bench writes shards
    except ImportError:
        return {"name": DECODE, "skipped": "webdataset is not installed (carry its wheel and braceexpand's)"}
    sizes = ["--images", "256", "--stored-size", "64", "--batch-size", "16", "--steps", "4"]
    if not quick:
        sizes = ["--images", "8192", "--batch-size", "256", "--steps", "24"]
    json_file = scratch / "decode.json"
    command = [sys.executable, "-m", "distvit.cli", "bench", "decode", *sizes, "--json", str(json_file)]
    completed = _run(command, timeout, out)
    if completed.returncode or not json_file.exists():
        return {"name": DECODE, "error": f"exit {completed.returncode}"}
    return {"name": DECODE, "exit": 0, "decode": json.loads(json_file.read_text())}


def _decode_lines(case: dict) -> list[str]:
    lines = ["Decoding (`distvit bench decode`; images/s in total, per worker core, of the raw decoder's rate):"]
    if "decode" not in case:
        return [*lines, f"- {'skipped: ' + case['skipped'] if 'skipped' in case else 'FAILED: ' + case['error']}"]
    bench = case["decode"]
    context = bench["context"]
    lines.append(
        f"- {context['images']} images at {context['stored_size']} px, batch {context['batch_size']}, "
        f"{context['usable_cores']} cores, {context['device']}"
    )
    lines += [f"- raw, one core: {r['name']} {r['images_per_sec']:,.0f}" for r in bench["raw"]]
    turbo = bench["raw"][-1]["images_per_sec"]
    for r in bench["pipelines"]:
        per_core = r["images_per_sec"] / max(r["workers"], 1)
        of_raw = f", {per_core / turbo:.2f} of raw" if "JPEG shards" in r["name"] else ""
        lines.append(
            f"- {r['name']}, workers {r['workers']}: {r['images_per_sec']:,.0f} ({per_core:,.0f} per core{of_raw})"
        )
    on_gpu = [r["images_per_sec"] for r in bench["pipelines"] if "GPU" in r["name"]]
    if on_gpu:
        met = "met" if max(on_gpu) >= DEVICE_DECODE_TARGET else "MISSED"
        lines.append(
            f"- JPEG decoded on the GPU, best {max(on_gpu):,.0f} img/s: **{met}**: >= {DEVICE_DECODE_TARGET:,}"
        )
    return lines


def run_paths(timeout: float, out: Path, quick: bool) -> dict:
    """launch/gpu_paths.py as one phase: its own table and JSON land in OUT_DIR beside this one's."""
    try:
        import webdataset  # noqa: F401 - the paths phase trains from shards
    except ImportError:
        return {"name": PATHS, "skipped": "webdataset is not installed (carry its wheel and braceexpand's)"}
    command = [sys.executable, str(REPO / "launch" / "gpu_paths.py"), str(out), "--deadline", str(timeout - 10)]
    completed = _run(command + (["--quick"] if quick else []), timeout, out)
    report = out / "gpu_paths.json"
    if not report.exists():
        last = (completed.stdout + completed.stderr).strip().splitlines()[-1:] or [""]
        return {"name": PATHS, "error": f"exit {completed.returncode}: {last[0][:300]}"}
    return {"name": PATHS, "exit": completed.returncode, **json.loads(report.read_text())}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def verdicts(case: dict) -> list[str]:
    """The issue's targets for this case, each marked met or missed."""
    distvit = case["results"][0]
    marks = []
    if case["device"].startswith("cpu"):
        return marks  # the targets are for an H100 or H200
    rate_target, ratio_target = TARGETS.get(case["name"], (None, None))
    if rate_target:
        marks.append(f"{'met' if distvit['images_per_sec'] >= rate_target else 'MISSED'}: >= {rate_target:,} img/s")
    if ratio_target:
        marks.append(
            f"{'met' if distvit['ratio_to_lesson'] >= ratio_target else 'MISSED'}: >= {ratio_target:g}x lesson"
        )
    if case["name"] == AUGMENTED:
        augment = distvit["phase_fractions"].get("augment", 0.0)
        marks.append(f"{'met' if augment < MAX_AUGMENT_FRACTION else 'MISSED'}: augment {augment:.1%} < 5%")
    if rate_target:
        data = distvit["phase_fractions"]["data"]
        marks.append(f"{'met' if data < MAX_DATA_FRACTION else 'MISSED'}: data < {MAX_DATA_FRACTION:.0%}")
    return marks


def markdown(cases: list[dict]) -> str:
    first = next((c for c in cases if "results" in c), None)
    header = ["# distvit GPU check", ""]
    if first:
        versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
        header += [
            f"Device: {first['device']}; {versions}.",
            f"Peak used for the FLOP/s share: {first['peak_source']}.",
            "",
        ]
    rows = [
        "| case | loop | precision | batch | images/s | x lesson | ms/step | data | fwd+bwd | optim | "
        "peak mem | TFLOP/s | of peak | host syncs/step | compile s | targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    checks = []
    paths, epochs, profiles, readers, decode, syncs = [], [], [], [], [], []
    for case in cases:
        if case["name"] in gpu_peer.PHASES:
            continue
        if case["name"] == DECODE:
            decode = _decode_lines(case)
            continue
        if case["name"] == PATHS:
            paths = _paths_lines(case)
            continue
        if case["name"] == READERS:
            readers = _readers_lines(case)
            continue
        if "results" not in case:
            what = f"skipped: {case['skipped']}" if "skipped" in case else f"FAILED: {case['error']}"
            rows.append(f"| {case['name']} | {what} |" + " |" * 14)
            continue
        if case.get("epoch"):
            epochs.append(_epoch_line(case))
        sites = case["results"][0].get("host_sync_sites")
        if sites:
            syncs.append(f"- {case['name']}: {', '.join(sorted(set(sites)))}")
        if case.get("profile"):
            profiles.append(_profile_line(case))
        for m in case["results"]:
            f = m["phase_fractions"]
            lesson = m["name"] == "lesson"
            rows.append(
                f"| {case['name']} | {m['name']} | {'fp32' if lesson else case['mixed_precision']} | "
                f"{m['batch_size']} | "
                f"{m['images_per_sec']:,.0f} | {m['ratio_to_lesson']:.1f}x | {m['step_ms']:.1f} | {f['data']:.1%}"
                f"{' (augment ' + format(f['augment'], '.1%') + ')' if f.get('augment') else ''} | "
                f"{f['forward_backward']:.1%} | {f['optimizer']:.1%} | "
                f"{m['peak_memory_bytes'] / 2**30:.2f} GiB | {m['achieved_tflops']:.1f} | {m['peak_fraction']:.1%} | "
                f"{'-' if m['host_syncs_per_step'] is None else format(m['host_syncs_per_step'], '.1f')} | "
                f"{'-' if lesson else format(case['compile_seconds'], '.1f')} | "
                f"{'-' if lesson else '; '.join(verdicts(case))} |"
            )
        if case.get("check"):
            c = case["check"]
            checks.append(
                f"- {case['name']}: fast path ({c['precision']}, compiled={c['compiled']}) "
                "vs fp32 eager reference over "
                f"{c['steps']} steps on the same batches: logits within {c['logit_error']:.2%} (tolerance "
                f"{c['logit_tolerance']:.0%}), losses within {c['loss_error']:.2%} "
                f"(tolerance {c['loss_tolerance']:.0%}), "
                f"weight updates within {c['update_error']:.1%} (tolerance {c['update_tolerance']:.0%}): "
                f"**{'PASS' if c['passed'] else 'FAIL'}**"
            )
    lines = header + rows + ["", "Fast-path check:", *checks]
    if epochs:
        lines += ["", "One epoch end to end (feature pass included):", *epochs]
    if profiles:
        lines += ["", "Profiles (gpu_profiles.txt has the tables):", *profiles]
    if syncs:
        lines += ["", "Host synchronisations in the checked warm-up steps, where they were called:", *syncs]
    if readers:
        lines += ["", *readers]
    if decode:
        lines += ["", *decode]
    if paths:
        lines += ["", *paths]
    peer = gpu_peer.side_by_side(cases)
    lines += ["", *peer] if peer else []
    return "\n".join(lines + [""])


def _epoch_line(case: dict) -> str:
    e = case["epoch"]
    features = f"features {e['feature_seconds']:.1f} s + " if e.get("feature_seconds") else ""
    return (
        f"- {case['name']}: {e['images']:,} images, distvit {e['distvit_seconds']:.1f} s ({features}"
        f"steps {e['distvit_seconds'] - (e.get('feature_seconds') or 0):.1f} s), lesson {e['lesson_seconds']:.1f} s: "
        f"**{e['ratio']:.1f}x**"
    )


def _profile_line(case: dict) -> str:
    p = case["profile"]
    if "error" in p:
        return f"- {case['name']}: profiler failed: {p['error']}"
    top = ", ".join(f"{k['name'][:60]} {k['share']:.0%}" for k in p.get("top", [])[:3])
    busy = p.get("device_busy_unprofiled")
    share = (
        f"{p['device_ms_per_step']:.1f} ms of device work per {p['unprofiled_step_ms']:.1f} ms step: "
        f"busy {busy:.0%}, host gaps {1 - busy:.0%}"
        if busy is not None
        else f"{p.get('steps')} steps in {1000 * p.get('window_seconds', 0):.1f} ms"
    )
    return f"- {case['name']}: {share}" + (f"; top: {top}" if top else "")


def _readers_lines(case: dict) -> list[str]:
    lines = ["Data readers (`distvit bench data`; images/s, x the lesson's pipeline):"]
    if "readers" not in case:
        return [*lines, f"- skipped: {case['skipped']}"]
    for label, bench in case["readers"].items():
        rates = ", ".join(
            f"{r['name'].split(':')[0]} {r['images_per_sec']:,.0f} ({r['ratio_to_lesson']:.2f}x)"
            for r in bench["results"]
        )
        lines.append(f"- {label} on {bench['device']}: {rates}")
    if "error" in case:
        lines.append(f"- FAILED: {case['error']}")
    return lines


def _paths_lines(case: dict) -> list[str]:
    title = "CUDA paths (launch/gpu_paths.py; gpu_paths.md has the details):"
    if "checks" not in case:
        return [title, f"- {'skipped: ' + case['skipped'] if 'skipped' in case else 'FAILED: ' + case['error']}"]
    lines = [title]
    for check in case["checks"]:
        result = "skipped" if check["passed"] is None else ("PASS" if check["passed"] else "FAIL")
        lines.append(f"- {check['name']}: **{result}**: {check['summary']}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (gpu_check.md, gpu_check.json, per-case JSON and the log)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, any device: checks the script itself")
    parser.add_argument(
        "--budget", type=float, default=560, help="seconds for all phases; what does not fit is skipped (said so)"
    )
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, help="timm beside (default: not --quick)")
    args = parser.parse_args()
    peer = not args.quick if args.peer is None else args.peer
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gpu_check.log", "gpu_profiles.txt", "gpu_paths.md", "gpu_paths.json", "gpu_paths.log"):
        (out / name).unlink(missing_ok=True)  # never report an earlier run's results
    end = time.time() + args.budget
    cases: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:  # the benchmarks' run directories stay out of OUT_DIR
        for name, config, overrides, flags, longest in gpu_peer.order(CASES, peer):
            left = min(longest, end - time.time())
            if left < MIN_CASE_S:
                cases.append({"name": name, "skipped": f"the --budget of {args.budget:.0f} s was used up"})
            elif name in gpu_peer.PHASES:
                cases.append(gpu_peer.run_phase(name, cases, CASES, left, out, Path(scratch), args.quick, _run))
            elif name == PATHS:
                cases.append(run_paths(left, out, args.quick))
            elif name == READERS:
                cases.append(run_readers(left, out, Path(scratch), args.quick))
            elif name == DECODE:
                cases.append(run_decode(left, out, Path(scratch), args.quick))
            elif name == AUGMENTED and not _importable("kornia"):
                cases.append({"name": name, "skipped": "kornia is not installed (carry its wheel and kornia_rs's)"})
            else:
                cases.append(run_case(name, config, overrides, flags, left, out, Path(scratch), args.quick))
            # written after every case: a later case that hangs or dies leaves the earlier ones
            (out / "gpu_check.json").write_text(json.dumps(cases, indent=1) + "\n")
            table = markdown(cases)
            (out / "gpu_check.md").write_text(table)
    print(table)
    broken = [c["name"] for c in cases if "error" in c or c.get("exit", 0) != 0]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
