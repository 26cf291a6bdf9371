"""launch/gpu_peer.py (gpu_check.py's side by side with timm) without timm's scripts: its parsers on
recorded output of timm's benchmark.py and train.py, its verdicts, its report, its place in gpu_check's
order, a clear skip where launch/peer/timm is missing, and launch/get_timm_scripts.sh on a local repo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.support.helpers import REPO

sys.path.insert(0, str(REPO / "launch"))
try:
    import gpu_check
    import gpu_peer
finally:
    sys.path.remove(str(REPO / "launch"))

# timm benchmark.py (HEAD aa4b5850, timm 1.0.31) on the 2-core CPU: its log, then its printed result
BENCH_STDOUT = """Benchmarking in float32 precision. NCHW layout. torchscript disabled
Model deit_tiny_patch16_224 created, param count: 5362762
Running train benchmark on deit_tiny_patch16_224 for 5 steps w/ input size (3, 32, 32) and batch size 8.
Train [1/5]. 1.48 samples/sec. 5412.961 ms/step.
Train [5/5]. 2.05 samples/sec. 3904.432 ms/step.
Train benchmark of deit_tiny_patch16_224 done. 2.05 samples/sec, 3904.43 ms/sample
--result
{
    "model": "deit_tiny_patch16_224",
    "train_samples_per_sec": 2.05,
    "train_step_time": 3904.432,
    "train_batch_size": 8,
    "train_img_size": 32,
    "param_count": 5.36
}
"""
# timm train.py (same ref), 64 images, batch 16, 2 epochs, --log-interval 1, on the CPU
TRAIN_LOG = "\n".join(
    [
        "gpu_peer: optimizer AdamW fused=True",
        "Train: 0 [   0/4 ( 25%)]  Loss: 2.35 (2.35)  Time: 3.545s,    4.51/s  (3.545s,    4.51/s)"
        "  LR: 1.000e-05  Data: 0.094 (0.094)",
        "Train: 0 [   1/4 ( 50%)]  Loss: 2.25 (2.30)  Time: 1.737s,    9.21/s  (2.641s,    6.06/s)"
        "  LR: 1.000e-05  Data: 0.023 (0.059)",
        "Train: 0 [   2/4 ( 75%)]  Loss: 2.28 (2.30)  Time: 0.607s,   26.37/s  (1.963s,    8.15/s)"
        "  LR: 1.000e-05  Data: 0.020 (0.046)",
        "Train: 0 [   3/4 (100%)]  Loss: 2.41 (2.32)  Time: 2.567s,    6.23/s  (2.114s,    7.57/s)"
        "  LR: 1.000e-05  Data: 0.000 (0.034)",
        "Skipping eval and checkpointing",
        "Train: 1 [   0/4 ( 25%)]  Loss: 2.29 (2.29)  Time: 0.882s,   18.14/s  (0.882s,   18.14/s)"
        "  LR: 5.008e-03  Data: 0.061 (0.061)",
        "Train: 1 [   1/4 ( 50%)]  Loss: 2.49 (2.39)  Time: 0.797s,   20.07/s  (0.839s,   19.06/s)"
        "  LR: 5.008e-03  Data: 0.002 (0.032)",
        "Train: 1 [   2/4 ( 75%)]  Loss: 2.80 (2.52)  Time: 3.133s,    5.11/s  (1.604s,    9.97/s)"
        "  LR: 5.008e-03  Data: 0.027 (0.030)",
        "Train: 1 [   3/4 (100%)]  Loss: 2.70 (2.57)  Time: 2.423s,    6.60/s  (1.809s,    8.85/s)"
        "  LR: 5.008e-03  Data: 0.000 (0.023)",
        "Test: [   0/0]  Time: 0.164 (0.164)  Loss:   2.860 ( 2.860)  "
        "Acc@1:  12.500 ( 12.500)  Acc@5:  25.000 ( 25.000)",
        "--result",
        "[",
        "    {",
        '        "epoch": 1,',
        '        "train": {',
        '            "loss": 2.57',
        "        },",
        '        "validation": {',
        '            "loss": 2.86,',
        '            "top1": 12.5,',
        '            "top5": 25.0',
        "        }",
        "    }",
        "]",
        "",
    ]
)


def test_benchmark_result_is_read_from_its_file_else_from_its_output():
    printed = gpu_peer.parse_benchmark(BENCH_STDOUT)
    assert printed == {
        "model": "deit_tiny_patch16_224",
        "images_per_sec": 2.05,
        "step_ms": 3904.432,
        "batch_size": 8,
        "img_size": 32,
    }
    filed = json.dumps({**json.loads(BENCH_STDOUT.split("--result\n")[1]), "train_samples_per_sec": 19000.5})
    assert gpu_peer.parse_benchmark(BENCH_STDOUT, filed)["images_per_sec"] == 19000.5  # the file wins
    assert gpu_peer.parse_benchmark(BENCH_STDOUT, "{not json")["images_per_sec"] == 2.05  # a torn file: the log
    listed = BENCH_STDOUT.replace("--result\n{", "--result\n[{").rstrip() + "]\n"
    assert gpu_peer.parse_benchmark(listed)["images_per_sec"] == 2.05


@pytest.mark.parametrize(
    "output, message",
    [
        (BENCH_STDOUT.split("--result")[0], "printed no result"),
        ('--result\n{"model": "m", "error": "CUDA out of memory."}', "CUDA out of memory"),
        ('--result\n{"model": "m", "train_samples_per_sec": 0}', "no train_samples_per_sec"),
        ('--result\n{"model": "m", "infer_samples_per_sec": 5.0}', "no train_samples_per_sec"),
        ("--result\n{'model': 1}", "not JSON"),
        ('--result\n[{"model": "a"}, {"model": "b"}]', "not one model's"),
    ],
)
def test_benchmark_without_a_train_rate_is_an_error(output, message):
    with pytest.raises(ValueError, match=message):
        gpu_peer.parse_benchmark(output)


def test_train_log_is_timed_over_its_last_whole_epoch():
    parsed = gpu_peer.parse_train_log(TRAIN_LOG, batch_size=16, skip=3)
    assert parsed["timed"] == "epoch 1" and parsed["steps_timed"] == 4 and parsed["images_timed"] == 64
    assert (parsed["epochs_logged"], parsed["steps_logged"]) == (2, 8)
    # the same as timm's own running average on the epoch's last line (8.85/s)
    assert parsed["images_per_sec"] == pytest.approx(8.85, abs=0.005)
    assert parsed["seconds_timed"] == pytest.approx(16 / 18.14 + 16 / 20.07 + 16 / 5.11 + 16 / 6.60)
    assert gpu_peer.parse_top1(TRAIN_LOG) == 12.5


def test_train_log_of_one_or_a_torn_epoch_is_timed_after_its_first_steps():
    first_epoch = TRAIN_LOG.split("Skipping")[0]
    parsed = gpu_peer.parse_train_log(first_epoch, batch_size=16, skip=1)
    assert parsed["timed"] == "epoch 0, steps 1+" and parsed["steps_timed"] == 3
    assert parsed["images_per_sec"] == pytest.approx(48 / (16 / 9.21 + 16 / 26.37 + 16 / 6.23))
    torn = TRAIN_LOG.split("Train: 1 [   2/4")[0]  # timed out in epoch 1: epoch 0's steps after the first
    assert gpu_peer.parse_train_log(torn, batch_size=16, skip=1)["timed"] == "epoch 0, steps 1+"
    assert gpu_peer.parse_top1(torn) is None
    with pytest.raises(ValueError, match="none after the first 4"):
        gpu_peer.parse_train_log(first_epoch, batch_size=16, skip=4)
    with pytest.raises(ValueError, match="no training step"):
        gpu_peer.parse_train_log("Traceback (most recent call last):", batch_size=16, skip=1)
    assert gpu_peer._fused(TRAIN_LOG) is True and gpu_peer._fused("no optimizer line") is None


@pytest.mark.parametrize(
    "distvit, timm, target, expected",
    [
        (20_000.0, 20_000.0, 1.0, ("1.00x", "met")),
        (19_999.0, 20_000.0, 1.0, ("1.00x", "MISSED")),  # rounds to 1.00x, still short of the target
        (30_000.0, 10_000.0, 3.0, ("3.00x", "met")),
        (29_000.0, 10_000.0, 3.0, ("2.90x", "MISSED")),
        (None, 10_000.0, 1.0, ("-", "not measured")),
        (20_000.0, None, 1.0, ("-", "not measured")),
    ],
)
def test_verdicts(distvit, timm, target, expected):
    assert gpu_peer.verdict(distvit, timm, target) == expected


# a `distvit bench train --baseline lesson --json` record (2-core CPU, --quick sizes), rates set per test
RECORDED_CASE = {
    "device": "cpu (x86_64, 2 threads)",
    "world_size": 1,
    "mixed_precision": "no",
    "compile_seconds": 0.0,
    "peak_source": "measured 1024x1024 float32 matmul",
    "versions": {"torch": "2.14.1+cu130", "timm": "1.0.31", "accelerate": "1.16.0", "python": "3.11.7"},
    "check": None,
    "epoch": None,
    "profile": None,
}
RECORDED_RESULT = {
    "step_ms": 412.5,
    "steps": 2,
    "phase_fractions": {"data": 0.0178, "forward_backward": 0.9216, "optimizer": 0.0606, "augment": 0.0170},
    "peak_memory_bytes": 912478208,
    "achieved_tflops": 0.00627,
    "peak_fraction": 0.479,
    "host_syncs_per_step": None,
    "host_sync_sites": [],
}


def _distvit_case(name: str, rate: float, batch: int, precision: str = "bf16") -> dict:
    distvit = {**RECORDED_RESULT, "name": "distvit", "images_per_sec": rate, "batch_size": batch}
    lesson = {**distvit, "name": "lesson", "images_per_sec": rate / 10, "ratio_to_lesson": 1.0}
    results = [{**distvit, "ratio_to_lesson": 10.0}, lesson]
    return {**RECORDED_CASE, "name": name, "mixed_precision": precision, "results": results}


def _bench_row(case: str, rate: float, batch: int) -> dict:
    return {
        "case": case,
        "precision": "bf16 AMP, compiled",
        "fused_adamw": True,
        "batch_size": batch,
        "images_per_sec": rate,
        "step_ms": 1000 * batch / rate,
        "command": "benchmark.py --bench train",
    }


def test_side_by_side_table_has_each_ratio_and_verdict():
    source = {"ref": "v1.0.31", "commit": "a" * 40, "timm version at the commit": "1.0.31", "files_as_copied": True}
    bench = {"name": gpu_peer.BENCH, "exit": 1, "device": "cuda", "source": source}
    bench["rows"] = [
        _bench_row("deit_tiny 224/p16", 18_000.0, 512),
        _bench_row("deit_tiny 32/p4", 50_000.0, 1024),
        {"case": "deit_small 224/p16", "error": "exit 1: benchmark.py printed no result; Killed"},
    ]
    train = {"name": gpu_peer.TRAIN, "exit": 0, "device": "cuda", "precision": "bf16 AMP, compiled"}
    train |= {"fused_adamw": True, "batch_size": 512, "train_images": 20_000, "images_per_sec": 6_000.0}
    train |= {"timed": "epoch 1", "steps_timed": 39, "workers": 16, "wall_s": 80.0, "command": "train.py ..."}
    cases = [
        _distvit_case("deit_tiny 224/p16", 19_617.0, 512),
        _distvit_case("deit_tiny 32/p4", 41_648.0, 1024),
        {"name": "deit_small 224/p16", "skipped": "the --budget of 300 s was used up"},
        bench,
        train,
    ]
    lines = gpu_peer.side_by_side(cases)
    table = "\n".join(lines)
    assert lines[0] == "## Side by side with timm" and "v1.0.31 aaaaaaaaaaaa, timm 1.0.31 there" in table
    rows = [line for line in lines if line.startswith("| deit")]
    assert rows == [
        "| deit_tiny 224/p16 | 19,617 | bf16, 512 | benchmark.py --bench train (no data) | 18,000 | "
        "bf16 AMP, compiled, fused AdamW, 512 | 1.09x | >= 1x | met |",
        "| deit_tiny 32/p4 | 41,648 | bf16, 1024 | benchmark.py --bench train (no data) | 50,000 | "
        "bf16 AMP, compiled, fused AdamW, 1024 | 0.83x | >= 1x | MISSED |",
        "| deit_small 224/p16 | - | - (the --budget of 300 s was used up) | benchmark.py --bench train (no data) | "
        "FAILED | -, - | - | >= 1x | not measured |",
        "| deit_tiny 224/p16 | 19,617 | bf16, 512 | train.py end to end (20,000 PNGs) | 6,000 | "
        "bf16 AMP, compiled, fused AdamW, 512 | 3.27x | >= 3x | met |",
    ]
    assert "- benchmark.py, deit_small 224/p16: exit 1: benchmark.py printed no result; Killed" in lines
    assert "On a CPU" not in table and "CHANGED" not in table
    assert "- train.py: 6,000 img/s over epoch 1 (39 steps" in table
    # the markdown gpu_check.py writes carries the section, and the peer phases make no rows of their own
    report = gpu_check.markdown(cases)
    assert report.endswith("\n".join(lines) + "\n") and gpu_peer.BENCH not in report.split("## Side by side")[0]


def test_side_by_side_says_why_the_peer_was_skipped():
    skipped = [{"name": name, "skipped": gpu_peer.HOW_TO_GET} for name in gpu_peer.PHASES]
    assert gpu_peer.side_by_side(skipped) == [
        "## Side by side with timm",
        "",
        f"- timm benchmark.py (peer): skipped: {gpu_peer.HOW_TO_GET}",
        f"- timm train.py (peer): skipped: {gpu_peer.HOW_TO_GET}",
    ]
    assert gpu_peer.side_by_side([_distvit_case("deit_tiny 224/p16", 1.0, 8)]) == []  # no peer: no section


def test_missing_scripts_skip_the_phase_with_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_peer, "PEER_DIR", tmp_path / "peer" / "timm")

    def never(*args):
        raise AssertionError("nothing may run without the scripts")

    for name in gpu_peer.PHASES:
        phase = gpu_peer.run_phase(name, [], gpu_check.CASES, 100.0, tmp_path, tmp_path, True, never)
        assert phase == {"name": name, "skipped": gpu_peer.HOW_TO_GET}
    assert "launch/get_timm_scripts.sh" in gpu_peer.HOW_TO_GET and "carry launch/peer" in gpu_peer.HOW_TO_GET


def test_source_record_notices_a_changed_script(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_peer, "PEER_DIR", tmp_path)
    digests = []
    for name in ("train.py", "benchmark.py"):
        text = f"# {name}\n"
        (tmp_path / name).write_text(text)
        digests.append(f"sha256 {name}: {hashlib.sha256(text.encode()).hexdigest()}")
    (tmp_path / "SOURCE.txt").write_text("ref: v1.0.31\ncommit: " + "b" * 40 + "\n" + "\n".join(digests) + "\n")
    assert gpu_peer.source()["files_as_copied"] is True and gpu_peer.source()["ref"] == "v1.0.31"
    (tmp_path / "train.py").write_text("# edited\n")
    assert gpu_peer.source()["changed"] == ["train.py"] and gpu_peer.source()["files_as_copied"] is False


def test_peer_runs_right_after_the_two_deit_tiny_cases():
    names = [case[0] for case in gpu_peer.order(gpu_check.CASES, peer=True)]
    assert names[:5] == ["deit_tiny 224/p16", "deit_tiny 32/p4", "deit_small 224/p16", gpu_peer.BENCH, gpu_peer.TRAIN]
    assert sorted(names) == sorted([c[0] for c in gpu_check.CASES] + list(gpu_peer.PHASES))
    assert gpu_peer.order(gpu_check.CASES, peer=False) == gpu_check.CASES
    bench = gpu_peer.order(gpu_check.CASES, peer=True)[3]
    assert bench == (gpu_peer.BENCH, "", [], [], gpu_peer.LONGEST[gpu_peer.BENCH])


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.mark.parametrize("tagged", [True, False])
def test_get_timm_scripts_copies_the_installed_versions_tag_else_head(tmp_path, tagged):
    """launch/get_timm_scripts.sh on a local stand-in for timm's repository: the tag of the installed timm
    where there is one, else HEAD; SOURCE.txt records the ref, the commit and each file's sha256."""
    import timm

    repo = tmp_path / "timm-repo"
    (repo / "timm").mkdir(parents=True)
    git = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    _git("init", "-q", cwd=repo)
    for version in ("0.0.1", "0.0.2"):
        (repo / "timm" / "version.py").write_text(f"__version__ = '{version}'\n")
        for name in ("train.py", "benchmark.py"):
            (repo / name).write_text(f"import sys\nprint('{name} {version}')\n")
        _git("add", ".", cwd=repo)
        _git(*git, "commit", "-q", "-m", version, cwd=repo)
        if tagged and version == "0.0.1":
            _git("tag", f"v{timm.__version__}", cwd=repo)
    dest = tmp_path / "dest"
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "TIMM_SCRIPTS_DEST": str(dest)}
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "get_timm_scripts.sh"), str(repo)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = dict(line.split(": ", 1) for line in (dest / "SOURCE.txt").read_text().splitlines())
    version = "0.0.1" if tagged else "0.0.2"
    assert record["ref"] == (f"v{timm.__version__}" if tagged else "HEAD")
    assert record["timm version at the commit"] == version and record["timm installed when copied"] == timm.__version__
    assert len(record["commit"]) == 40
    for name in ("train.py", "benchmark.py"):
        text = (dest / name).read_text()
        assert text.endswith(f"print('{name} {version}')\n")
        assert record[f"sha256 {name}"] == hashlib.sha256(text.encode()).hexdigest()
    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE.txt", "benchmark.py", "train.py"]
    # a script that does not run with the installed timm is refused, said so
    (repo / "train.py").write_text("raise ImportError('cannot import name task from timm')\n")
    _git("add", ".", cwd=repo)
    _git(*git, "commit", "-q", "-m", "newer", cwd=repo)
    broken = subprocess.run(
        ["bash", str(REPO / "launch" / "get_timm_scripts.sh"), str(repo), "HEAD"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert broken.returncode == 1 and "train.py of HEAD does not run with timm" in broken.stderr
    assert "cannot import name task" in broken.stderr


def test_gpu_command_lines_parse_with_timms_own_parsers(tmp_path, monkeypatch):
    """The full-size commands the peer phase gives timm's scripts on a GPU (built here, not run), read by
    the scripts' own argument parsers: bf16 AMP, compiled, fused AdamW, distvit's batches and sizes."""
    import importlib.util

    if gpu_peer.missing():
        pytest.skip(gpu_peer.missing())
    commands = []

    def capture(command, timeout, out):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gpu_peer, "_device", lambda: "cuda")
    monkeypatch.setattr(gpu_peer, "write_image_folder", lambda *args: None)
    batches = {"deit_tiny 224/p16": 512, "deit_tiny 32/p4": 1024, "deit_small 224/p16": 512}
    bench = gpu_peer.run_benchmarks(batches, 600.0, tmp_path, tmp_path, False, capture)
    assert [r["error"] for r in bench["rows"]] == ["exit 0: benchmark.py printed no result; "] * 3
    train = gpu_peer.run_train(512, 600.0, tmp_path, tmp_path, False, capture)
    assert train["error"] == "exit 0: train.py logged no training step; " and train["epochs"] == 2
    assert [c[1:3] for c in commands] == [[gpu_peer.__file__, "--run-timm"]] * 4

    def parser_of(script):
        spec = importlib.util.spec_from_file_location(f"timm_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # defines the parser; main() runs only as __main__
        return module.parser

    parse = parser_of(gpu_peer.PEER_DIR / "benchmark.py").parse_args
    for command, (case, model, kwargs, size) in zip(commands[:3], gpu_peer.MODELS):
        args = parse(command[4:])
        assert (args.bench, args.model, args.img_size, args.batch_size) == ("train", model, size, batches[case])
        assert args.model_kwargs == {k: int(v) for k, v in (kw.split("=") for kw in kwargs)}
        assert (args.amp, args.amp_dtype, args.torchcompile, args.opt) == (True, "bfloat16", "inductor", "adamw")
        assert (args.num_classes, args.device, args.no_retry, args.results_format) == (10, "cuda", True, "json")
    args = parser_of(gpu_peer.PEER_DIR / "train.py").parse_args(commands[3][4:])
    assert (args.model, args.img_size, args.batch_size, args.epochs) == ("deit_tiny_patch16_224", 224, 512, 2)
    assert (args.amp, args.amp_dtype, args.torchcompile, args.opt) == (True, "bfloat16", "inductor", "adamw")
    assert args.opt_kwargs == {"fused": True} and args.workers == gpu_peer._cores() and args.color_jitter == 0
    assert (args.log_interval, args.val_interval, args.num_classes, args.device) == (1, 2, 10, "cuda")
