"""GPU check of distvit's fast path, one command, nothing downloaded (about 5 minutes on one H100):

    python3 launch/gpu_check.py OUT_DIR

Needs only torch, torchvision, timm and accelerate (pydantic, webdataset and wandb are optional): the
images are the built-in synthetic CIFAR-format data, generated in memory; the models are random-init
timm DeiTs (speed does not depend on the weights). For each case it runs `distvit bench train` with the
lesson's baseline in the same process:

- deit_tiny 224/p16 with `--check` first: the fast path (bf16, compile, fused kernels, device-side
  data) and an fp32 eager reference train side by side from the same weights on the same batches;
  logits and losses must agree within bf16 tolerance;
- deit_tiny 32/p4, deit_tiny 32/p16 and deit_small 224/p16.

Writes OUT_DIR/gpu_check.md (a table, with the hardware and versions, and the issue's targets marked)
and OUT_DIR/gpu_check.json; exits 1 if the check fails or a run breaks. `--quick` runs tiny sizes
(any machine, CPU included) to check the script itself.
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

REPO = Path(__file__).resolve().parents[1]

# name, overrides of configs/demo.yaml (random init, AdamW, crop/flip), extra bench flags
CASES = [
    # no warmup: the check's steps train at the full lr, so a wrong weight update shows
    ("deit_tiny 224/p16", ["surgery.img_size=224", "train.batch_size=512", "optim.warmup_epochs=0"], ["--check"]),
    ("deit_tiny 32/p4", ["surgery.img_size=32", "surgery.patch_size=4", "train.batch_size=1024"], []),
    ("deit_tiny 32/p16", ["surgery.img_size=32", "train.batch_size=1024"], []),
    ("deit_small 224/p16", ["model.name=deit_small_patch16_224", "surgery.img_size=224", "train.batch_size=512"], []),
]
QUICK = ["surgery.img_size=32", "train.batch_size=16", "train.compile=false"]  # appended last: wins
TARGETS = {  # case: (min images/s, min x lesson), from the speed issue (H100, bf16)
    "deit_tiny 224/p16": (12_000, 10.0),
    "deit_tiny 32/p4": (40_000, None),
}
MAX_DATA_FRACTION = 0.02
CASE_TIMEOUT_S = 300


def run_case(name: str, overrides: list[str], flags: list[str], out: Path, scratch: Path, quick: bool) -> dict:
    slug = name.replace(" ", "_").replace("/", "_")
    result_file = out / f"{slug}.json"
    result_file.unlink(missing_ok=True)  # never report an earlier run's numbers
    sizes = (
        ["--synthetic", "200", "--steps", "2", "--warmup", "1"]
        if quick
        else ["--synthetic", "20000", "--steps", "40", "--warmup", "8"]
    )
    command = [
        sys.executable,
        "-m",
        "distvit.cli",
        "bench",
        "train",
        "--config",
        "configs/demo.yaml",
        "--baseline",
        "lesson",
        "--run-dir",
        str(scratch / slug),
        "--json",
        str(result_file),
        *sizes,
        *flags,
        *overrides,
        *(QUICK if quick else []),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        completed = subprocess.CompletedProcess(
            command, "timeout", _text(err.stdout), _text(err.stderr) + f"\ntimed out after {CASE_TIMEOUT_S} s"
        )
    with open(out / "gpu_check.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n{completed.stdout}{completed.stderr}\n")
    print(completed.stdout, flush=True)
    if not result_file.exists():
        last = completed.stderr.strip().splitlines()[-1:] or [""]
        return {"name": name, "error": f"exit {completed.returncode}: {last[0][:200]}"}
    return {
        "name": name,
        "wall_s": time.perf_counter() - start,
        "exit": completed.returncode,
        **json.loads(result_file.read_text()),
    }


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def verdicts(case: dict) -> list[str]:
    """The issue's targets for this case, each marked met or missed."""
    distvit = case["results"][0]
    marks = []
    if case["device"].startswith("cpu"):
        return marks  # the targets are for an H100
    rate_target, ratio_target = TARGETS.get(case["name"], (None, None))
    if rate_target:
        marks.append(f"{'met' if distvit['images_per_sec'] >= rate_target else 'MISSED'}: >= {rate_target:,} img/s")
    if ratio_target:
        marks.append(
            f"{'met' if distvit['ratio_to_lesson'] >= ratio_target else 'MISSED'}: >= {ratio_target:g}x lesson"
        )
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
    for case in cases:
        if "results" not in case:
            rows.append(f"| {case['name']} | FAILED: {case['error']} |" + " |" * 14)
            continue
        for m in case["results"]:
            f = m["phase_fractions"]
            lesson = m["name"] == "lesson"
            rows.append(
                f"| {case['name']} | {m['name']} | {'fp32' if lesson else case['mixed_precision']} | "
                f"{m['batch_size']} | "
                f"{m['images_per_sec']:,.0f} | {m['ratio_to_lesson']:.1f}x | {m['step_ms']:.1f} | {f['data']:.1%} | "
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
    return "\n".join(header + rows + ["", "Fast-path check:", *checks, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (gpu_check.md, gpu_check.json, per-case JSON and the log)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, any device: checks the script itself")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").unlink(missing_ok=True)
    cases: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:  # the benchmarks' run directories stay out of OUT_DIR
        for name, overrides, flags in CASES:
            cases.append(run_case(name, overrides, flags, out, Path(scratch), args.quick))
            # written after every case: a later case that hangs or dies leaves the earlier ones
            (out / "gpu_check.json").write_text(json.dumps(cases, indent=1) + "\n")
            table = markdown(cases)
            (out / "gpu_check.md").write_text(table)
    print(table)
    broken = [c["name"] for c in cases if "results" not in c or c["exit"] != 0]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
