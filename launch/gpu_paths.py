"""The CUDA-only training paths, checked with 1 and 2 ranks on one GPU (nothing downloaded):

    python3 launch/gpu_paths.py OUT_DIR [--quick] [--deadline SECONDS]

Two ranks share the GPU and talk through gloo (distvit picks it where a node has more ranks than GPUs:
NCCL refuses two ranks on one device). Runs that check correctness, not speed, run side by side. Checks:

- compile_ddp_accum: bf16 + torch.compile + DDP + fused AdamW + gradient accumulation 2 on 2 ranks; any
  recompilation during a training step after the first is an error (dynamo's error_on_recompile);
- one_vs_two_ranks: fp32 with TF32 off, 1 rank vs 2 ranks, same global batch: equal weights (the CPU
  test's tolerance, 1e-5) and losses;
- stop_resume_bf16: every training feature on, 2 ranks, bf16: stopped mid-epoch and resumed, it must end
  bit-equal (weights, EMA, optimizer moments) to an uninterrupted run; a second uninterrupted run shows
  whether the GPU's kernels are deterministic run to run at all;
- fp16_overflow: fp16 loss scaling with fused AdamW; one step forced to overflow: its update is skipped
  (weights unchanged, scale halved, no scheduler step), and a run stopped after it and resumed ends
  bit-equal to an uninterrupted one, scaler state included;
- eval_one_vs_two: `distvit evaluate` of one checkpoint in bf16 on 1 and 2 ranks: identical counts.

Writes OUT_DIR/gpu_paths.md, gpu_paths.json and gpu_paths.log; exits 1 if a check fails. `--quick` runs
tiny sizes on any machine (on a CPU the fp16 check is skipped: it needs CUDA) to check the script itself.
Run as `accelerate launch ... gpu_paths.py --as-rank ARGS`, it is one rank of distvit/train.py with the
checks' instruments (set from GPU_PATHS_* variables).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # distvit from this checkout, installed or not

OVERFLOW_STEP = 3  # the fp16 run's step whose loss is made to overflow
FEATURES = [  # stop_resume_bf16: every training feature that carries state across a resume
    "ema.enabled=true",
    "mix.mixup_alpha=0.8",
    "mix.cutmix_alpha=1.0",
    "train.label_smoothing=0.1",
    "optim.clip_grad_norm=1.0",
    "train.grad_accum_steps=2",
    "surgery.drop_path=0.1",
    "optim.fused=true",
    "checkpoint.every_steps=4",
    "checkpoint.stop_check_every=5",
]


# ---------------------------------------------------------------------------------------------- one rank
def as_rank(argv: list[str]) -> int:
    """One rank of distvit/train.py with the instruments the GPU_PATHS_* variables ask for."""
    import atexit

    import torch

    from distvit.cli import train_main

    report: dict = {"rank": int(os.environ.get("RANK", "0"))}
    if os.environ.get("GPU_PATHS_TF32_OFF"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if os.environ.get("GPU_PATHS_DETERMINISTIC"):
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn: SDPA's backward has no such kernel
    if os.environ.get("GPU_PATHS_NO_RECOMPILE"):
        _forbid_recompiles_in_steps(report)
    if os.environ.get("GPU_PATHS_OVERFLOW_STEP"):
        _force_overflow(int(os.environ["GPU_PATHS_OVERFLOW_STEP"]), report)
    if os.environ.get("GPU_PATHS_REPORT"):

        def write_report():
            try:
                from torch._dynamo.utils import counters

                report["dynamo"] = {group: dict(values) for group, values in counters.items()}
            except Exception as err:  # the report must be written whatever dynamo's state
                report["dynamo_error"] = repr(err)
            Path(f"{os.environ['GPU_PATHS_REPORT']}.rank{report['rank']}.json").write_text(json.dumps(report))

        atexit.register(write_report)
    return train_main(argv)


def _forbid_recompiles_in_steps(report: dict) -> None:
    """Every training step after the first runs with dynamo's error_on_recompile: the compiled model
    must serve every step (micro-batches under no_sync, DDP's all-reduce, the padded last batch)."""
    import torch._dynamo

    from distvit.engine.step import TrainStep

    original = TrainStep.__call__
    report["steps"] = 0

    def step(self, *args, **kwargs):
        torch._dynamo.config.error_on_recompile = report["steps"] >= 1
        try:
            return original(self, *args, **kwargs)
        finally:
            torch._dynamo.config.error_on_recompile = False  # evaluation (eval mode) may compile its own graph
            report["steps"] += 1

    TrainStep.__call__ = step


def _force_overflow(at_step: int, report: dict) -> None:
    """Scale this process's `at_step`-th step's loss by 1e30: its fp16 gradients overflow. Records whether
    the weights, the loss scale and the scheduler moved in that step."""
    import torch

    from distvit.engine.step import TrainStep

    original_loss, original_step = TrainStep.loss, TrainStep._optimizer_step
    calls = {"steps": 0}

    def loss(self, *args, **kwargs):
        value = original_loss(self, *args, **kwargs)
        return value * 1e30 if calls["steps"] + 1 == at_step else value

    def optimizer_step(self):
        calls["steps"] += 1
        if calls["steps"] != at_step:
            return original_step(self)
        scaler, scheduler = self.accelerator.scaler, self.parts.scheduler
        weights = [p.detach().clone() for p in self.trainable]
        scale = scaler.get_scale if scaler is not None else lambda: None  # None: no loss scaling (CPU)
        before = (scale(), scheduler.last_epoch)
        original_step(self)
        report["overflow"] = {
            "step": at_step,
            "weights_changed": any(not torch.equal(w, p) for w, p in zip(weights, self.trainable)),
            "scale_before": before[0],
            "scale_after": scale(),
            "scheduler_steps_before": before[1],
            "scheduler_steps_after": scheduler.last_epoch,
        }

    TrainStep.loss, TrainStep._optimizer_step = loss, optimizer_step


# ---------------------------------------------------------------------------------------------- launches
@dataclass
class Launch:
    name: str
    ranks: int
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    module: bool = False  # args start with a module (-m), not distvit/train.py's arguments
    process: subprocess.Popen | None = None
    exit: int | str | None = None
    seconds: float = 0.0


class Runner:
    """Starts launches side by side (each its own rendezvous port), waits for them, keeps their output."""

    def __init__(self, work: Path, log: Path, quick: bool, deadline: float):
        self.work, self.log, self.quick, self.deadline = work, log, quick, deadline
        self.port = 29700 + os.getpid() % 1000
        self.cuda = _cuda_available()

    def command(self, launch: Launch) -> list[str]:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
        command += ["--num_processes", str(launch.ranks), "--dynamo_backend", "no"]
        if launch.ranks > 1:
            self.port += 1
            command += ["--multi_gpu", "--main_process_port", str(self.port)]
        elif not self.cuda:
            command += ["--cpu"]
        if launch.module:
            return command + ["-m", *launch.args]
        return command + [str(Path(__file__).resolve()), "--as-rank", *launch.args]

    def run_all(self, launches: list[Launch]) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1" if self.cuda else os.environ.get("OMP_NUM_THREADS", "1"),
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # cuBLAS's deterministic mode (GPU_PATHS_DETERMINISTIC)
            "WANDB_MODE": "disabled",
        }
        for launch in launches:
            launch.seconds = time.perf_counter()
            output = open(self.work / f"{launch.name}.out", "w")
            launch.process = subprocess.Popen(
                self.command(launch),
                cwd=REPO,
                env={**env, **launch.env},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            output.close()
        for launch in launches:
            try:
                launch.exit = launch.process.wait(timeout=max(1.0, self.deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(launch.process.pid, 9)
                launch.process.wait()
                launch.exit = "timeout"
            launch.seconds = time.perf_counter() - launch.seconds
            text = (self.work / f"{launch.name}.out").read_text(errors="replace")
            with open(self.log, "a") as log:
                log.write(f"=== {launch.name}: exit {launch.exit}, {launch.seconds:.1f} s\n")
                log.write(f"$ {' '.join(self.command_text(launch))}\n{_tail(text, 6000)}\n")

    def command_text(self, launch: Launch) -> list[str]:
        return [f"{k}={v}" for k, v in launch.env.items()] + [str(a) for a in launch.args]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _tail(text: str, chars: int) -> str:
    lines = [line for line in text.replace("\r", "\n").splitlines() if "it/s]" not in line]
    return "\n".join(lines)[-chars:]


# ---------------------------------------------------------------------------------------------- checks
@dataclass
class Check:
    name: str
    passed: bool | None  # None: skipped
    summary: str
    numbers: dict = field(default_factory=dict)


def _exits(launches: list[Launch], expected: dict[str, int] | None = None) -> str:
    """'' if every launch ended as expected (0 unless named), else what went wrong."""
    expected = expected or {}
    bad = [f"{x.name} exit {x.exit}" for x in launches if x.exit != expected.get(x.name, 0)]
    return "; ".join(bad)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _state_diffs(a: dict, b: dict) -> dict[str, float]:
    """Largest absolute differences of weights, EMA and optimizer moments of two checkpoints."""
    diffs = {"model": _max_diff(a["model"], b["model"])}
    if a.get("ema") is not None:
        diffs["ema"] = _max_diff(a["ema"], b["ema"])
    moments = [
        (state[key], b["optimizer"]["state"][index][key])
        for index, state in a["optimizer"]["state"].items()
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer")
        if key in state
    ]
    diffs["optimizer"] = max((x.float() - y.float()).abs().max().item() for x, y in moments)
    return diffs


def _losses(run_dir: Path) -> list[float]:
    from distvit.run.tracking import read_metrics

    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


def check_compile(launch: Launch, run_dir: Path, reports: list[dict]) -> Check:
    from distvit.run.rundir import read_summary

    problem = _exits([launch])
    numbers = {"seconds": round(launch.seconds, 1)}
    if not problem:
        summary = read_summary(run_dir)
        numbers |= {
            "compile_seconds": summary.get("compile_seconds"),
            "compute_dtype": summary.get("compute_dtype"),
            "accuracy": summary["final"]["accuracy"],
            "steps_checked_per_rank": [r.get("steps") for r in reports],
            "graphs_per_rank": [r.get("dynamo", {}).get("stats", {}).get("unique_graphs") for r in reports],
        }
        if not summary.get("compile_seconds"):
            problem = "the model was not compiled (compile_seconds is 0: see the log for the fallback)"
        elif len(reports) != 2 or not all(r.get("steps") for r in reports):
            problem = f"expected instrument reports from 2 ranks, got {len(reports)}"
    text = problem or (
        f"2 ranks, {numbers['compute_dtype']}, compiled in {numbers['compile_seconds']:.1f} s, "
        f"{numbers['steps_checked_per_rank']} steps per rank without a recompile, "
        f"dynamo graphs per rank {numbers['graphs_per_rank']}"
    )
    return Check("compile_ddp_accum", not problem, text, numbers)


def check_ranks(one: Launch, two: Launch, work: Path) -> Check:
    from distvit.run.checkpoint_files import load_checkpoint

    problem = _exits([one, two])
    if problem:
        return Check("one_vs_two_ranks", False, problem)
    a, b = load_checkpoint(work / one.name), load_checkpoint(work / two.name)
    weights = _max_diff(a["model"], b["model"])
    losses_a, losses_b = _losses(work / one.name), _losses(work / two.name)
    loss_diff = max(abs(x - y) for x, y in zip(losses_a, losses_b)) if len(losses_a) == len(losses_b) else None
    numbers = {"max_weight_diff": weights, "max_loss_diff": loss_diff, "steps": a["step"]}
    passed = a["step"] == b["step"] and weights < 1e-5 and loss_diff is not None and loss_diff < 1e-5
    text = (
        f"fp32, TF32 off, {a['step']} steps: weights differ by at most {weights:.2e}, logged losses by "
        f"{'-' if loss_diff is None else f'{loss_diff:.2e}'} (tolerance 1e-5, as on the CPU)"
    )
    return Check("one_vs_two_ranks", passed, text, numbers)


def check_resume(
    name: str, full: Launch, again: Launch, cut: Launch, resumed: Launch, stop_at: int, work: Path, extra=None
) -> Check:
    from distvit.run.checkpoint_files import load_checkpoint

    problem = _exits([full, again, cut, resumed])
    if problem:
        return Check(name, False, problem)
    a, control, b = (load_checkpoint(work / x.name) for x in (full, again, cut))
    resume_diff, control_diff = _state_diffs(a, b), _state_diffs(a, control)
    numbers = {"steps": [a["step"], b["step"]], "resumed_vs_full": resume_diff, "repeat_vs_full": control_diff}
    exact = a["step"] == b["step"] and not any(resume_diff.values())
    deterministic = not any(control_diff.values())
    text = (
        f"{a['step']} steps, stopped after step {stop_at} and resumed: "
        + ("bit-equal to the uninterrupted run" if exact else f"differs from the uninterrupted run by {resume_diff}")
        + ("; a repeated run is bit-equal too" if deterministic else f"; a repeated run differs by {control_diff}")
    )
    passed = exact
    if not exact and not deterministic:
        text += " (the GPU's kernels are not deterministic here: resume exactness cannot be told apart)"
    if extra:
        passed, text = extra(a, b, passed, text, numbers)
    return Check(name, passed, text, numbers)


def fp16_extra(reports: list[dict]):
    """The overflow step's record (weights unchanged, scale halved, no scheduler step) and the scaler
    states of the uninterrupted and the resumed run."""

    def judge(full: dict, resumed: dict, passed: bool, text: str, numbers: dict):
        overflow = next((r["overflow"] for r in reports if "overflow" in r), None)
        numbers["overflow"] = overflow
        numbers["scaler"] = [full.get("scaler"), resumed.get("scaler")]
        if overflow is None:
            return False, text + "; the forced overflow step never ran"
        skipped = (
            not overflow["weights_changed"]
            and overflow["scale_after"] == overflow["scale_before"] / 2
            and overflow["scheduler_steps_after"] == overflow["scheduler_steps_before"]
        )
        same_scaler = full.get("scaler") == resumed.get("scaler") and full.get("scaler") is not None
        text = (
            f"step {overflow['step']} overflowed: "
            + (
                f"skipped (weights unchanged, scale {overflow['scale_before']:g} -> {overflow['scale_after']:g}, "
                "no scheduler step)"
                if skipped
                else f"NOT skipped as expected ({overflow})"
            )
            + f"; scaler state after resume {'equal' if same_scaler else 'DIFFERENT'} "
            f"({full.get('scaler')} vs {resumed.get('scaler')}); " + text
        )
        return passed and skipped and same_scaler, text

    return judge


def check_eval(one: Launch, two: Launch, work: Path) -> Check:
    problem = _exits([one, two])
    if problem:
        return Check("eval_one_vs_two", False, problem)
    results = [json.loads((work / f"{x.name}.json").read_text()) for x in (one, two)]
    keys = ("correct", "num_samples", "confusion", "per_class_accuracy")
    differing = [k for k in keys if results[0][k] != results[1][k]]
    numbers = {"correct": [r["correct"] for r in results], "num_samples": [r["num_samples"] for r in results]}
    text = (
        f"{results[0]['correct']}/{results[0]['num_samples']} on 1 rank, "
        f"{results[1]['correct']}/{results[1]['num_samples']} on 2 ranks"
        + (": identical counts and confusion matrix" if not differing else f": {differing} differ")
    )
    return Check("eval_one_vs_two", not differing, text, numbers)


def _reports(work: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(work.glob(f"{name}.report.rank*.json"))]


# ---------------------------------------------------------------------------------------------- main
def run_checks(out: Path, quick: bool, deadline_s: float) -> list[Check]:
    """Every check, in a scratch folder removed afterwards (its runs hold ~1.7 GB of checkpoints)."""
    with tempfile.TemporaryDirectory(prefix="gpu_paths_") as scratch:
        return _run_checks(Path(scratch), out, quick, deadline_s)


def _run_checks(work: Path, out: Path, quick: bool, deadline_s: float) -> list[Check]:
    log = out / "gpu_paths.log"
    log.write_text("")
    deadline = time.time() + deadline_s
    runner = Runner(work, log, quick, deadline)
    train_size, test_size = (256, 67) if quick else (1024, 333)
    prepared = subprocess.run(
        [sys.executable, "-m", "distvit.cli", "prepare", "synthetic", "--out", str(work / "data")]
        + ["--train-size", str(train_size), "--test-size", str(test_size)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
        capture_output=True,
        text=True,
    )
    if prepared.returncode:
        return [Check("prepare", False, _tail(prepared.stdout + prepared.stderr, 500))]
    steps_per_epoch = train_size // 32
    stop_at = steps_per_epoch // 2 + 1  # mid-epoch, past a periodic checkpoint

    def train(name: str, ranks: int, extra: list[str], env: dict | None = None, resume: bool = False) -> Launch:
        run_dir = work / (name.removesuffix("_resumed"))
        args = ["--config", "configs/demo.yaml", f"data.path={work / 'data'}", f"run.dir={run_dir}"]
        args += ["tracking.backend=none", "run.overwrite=false", "train.log_every=2", "eval.batch_size=66"]
        args += extra + (["train.resume=auto"] if resume else [])
        env = {**(env or {}), "GPU_PATHS_REPORT": str(work / f"{name}.report")}
        return Launch(name, ranks, args, env)

    ranks_args = ["optim.name=sgd", "optim.lr=0.05", "optim.warmup_epochs=0", "augment.preset=none"]
    ranks_args += ["train.epochs=2", "train.batch_size=32", "train.mixed_precision=no", "train.compile=false"]
    # compile is checked once (compile_ddp_accum); elsewhere it would only add minutes of compiling
    bf16 = ["train.mixed_precision=bf16", "train.epochs=2", "train.batch_size=32", "train.compile=false", *FEATURES]
    fp16 = ["train.mixed_precision=fp16", "train.epochs=1", "train.batch_size=32", "train.compile=false"]
    fp16 += ["optim.fused=true"]
    fp16 += ["checkpoint.every_steps=2", "checkpoint.stop_check_every=1"]
    determinism = {"GPU_PATHS_DETERMINISTIC": "1"}
    overflow = {**determinism, "GPU_PATHS_OVERFLOW_STEP": str(OVERFLOW_STEP)}
    compiled = ["train.mixed_precision=bf16", "train.compile=true", "optim.fused=true", "train.grad_accum_steps=2"]
    compiled += ["train.epochs=1", "train.batch_size=64"]

    first = {
        "compile": train("compile", 2, compiled, {"GPU_PATHS_NO_RECOMPILE": "1"}),
        "fp32_one": train("fp32_one", 1, ranks_args, {"GPU_PATHS_TF32_OFF": "1"}),
        "fp32_two": train("fp32_two", 2, ranks_args, {"GPU_PATHS_TF32_OFF": "1"}),
        "bf16_full": train("bf16_full", 2, bf16, determinism),
        "bf16_again": train("bf16_again", 2, bf16, determinism),
        "bf16_cut": train("bf16_cut", 2, [*bf16, f"train.stop_at_step={stop_at}"], determinism),
    }
    if runner.cuda:
        first |= {
            "fp16_full": train("fp16_full", 1, fp16, overflow),
            "fp16_again": train("fp16_again", 1, fp16, overflow),
            "fp16_cut": train("fp16_cut", 1, [*fp16, f"train.stop_at_step={OVERFLOW_STEP + 2}"], overflow),
        }
    runner.run_all(list(first.values()))

    second = {"bf16_resumed": train("bf16_cut_resumed", 2, bf16, determinism, resume=True)}
    if runner.cuda:  # the resumed part starts after the overflow step: no instrument
        second["fp16_resumed"] = train("fp16_cut_resumed", 1, fp16, determinism, resume=True)
    bf16_eval = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    for ranks in (1, 2):
        evaluate = ["distvit.cli", "evaluate", str(work / "bf16_full"), "--batch-size", "334"]
        evaluate += ["--json", str(work / f"eval{ranks}.json")]
        second[f"eval{ranks}"] = Launch(f"eval{ranks}", ranks, evaluate, bf16_eval, module=True)
    runner.run_all(list(second.values()))

    checks = [
        check_compile(first["compile"], work / "compile", _reports(work, "compile")),
        check_ranks(first["fp32_one"], first["fp32_two"], work),
        check_resume(
            "stop_resume_bf16",
            first["bf16_full"],
            first["bf16_again"],
            first["bf16_cut"],
            second["bf16_resumed"],
            stop_at,
            work,
        ),
    ]
    if runner.cuda:
        checks.append(
            check_resume(
                "fp16_overflow",
                first["fp16_full"],
                first["fp16_again"],
                first["fp16_cut"],
                second["fp16_resumed"],
                OVERFLOW_STEP + 2,
                work,
                extra=fp16_extra(_reports(work, "fp16_full")),
            )
        )
    else:
        checks.append(Check("fp16_overflow", None, "fp16 loss scaling needs CUDA"))
    checks.append(check_eval(second["eval1"], second["eval2"], work))
    return checks


def markdown(checks: list[Check], device: str, seconds: float) -> str:
    rows = ["| check | result | what was seen |", "| --- | --- | --- |"]
    for check in checks:
        result = "skipped" if check.passed is None else ("PASS" if check.passed else "FAIL")
        rows.append(f"| {check.name} | {result} | {check.summary.replace('|', '/')} |")
    return "\n".join([f"# distvit CUDA paths ({device}, {seconds:.0f} s)", "", *rows, ""])


def main() -> int:
    if sys.argv[1:2] == ["--as-rank"]:
        return as_rank(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (gpu_paths.md, gpu_paths.json, gpu_paths.log)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, any device: checks the script itself")
    parser.add_argument("--deadline", type=float, default=420, help="seconds for all launches together")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    checks = run_checks(out, args.quick, args.deadline)
    seconds = time.perf_counter() - start
    (out / "gpu_paths.json").write_text(
        json.dumps({"device": device, "seconds": seconds, "checks": [c.__dict__ for c in checks]}, indent=1) + "\n"
    )
    table = markdown(checks, device, seconds)
    (out / "gpu_paths.md").write_text(table)
    print(table, flush=True)
    return 1 if any(c.passed is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
