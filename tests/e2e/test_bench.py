"""`distvit bench data` runs all pipelines and prints sane numbers and ratios (not a timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.helpers import REPO, accelerate_launch, run_cli, subprocess_env


def test_bench_data_smoke(small_dataset, tmp_path):
    result = run_cli(
        [
            "bench",
            "data",
            "--data",
            str(small_dataset),
            "--steps",
            "3",
            "--warmup",
            "1",
            "--batch-size",
            "32",
            "--json",
            str(tmp_path / "bench.json"),
        ]
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert (
        names[0].startswith("lesson")
        and names[1].startswith("distvit memory")
        and names[2].startswith("distvit stream")
    )
    for r in report["results"]:
        assert r["images_per_sec"] > 0 and r["batches"] == 3
        assert abs(r["ratio_to_lesson"] - r["images_per_sec"] / report["results"][0]["images_per_sec"]) < 1e-9
    assert "x lesson" in result.stdout and report["batch_size"] == 32


def test_bench_data_bad_split_is_clear(small_dataset):
    result = run_cli(["bench", "data", "--data", str(small_dataset), "--split", "nope"])
    assert result.returncode == 2 and "Available splits: train, test" in result.stderr


def test_bench_batch_larger_than_split_is_refused(small_dataset):
    result = run_cli(["bench", "data", "--data", str(small_dataset), "--split", "test", "--batch-size", "200"])
    assert result.returncode == 2 and "larger than split 'test' (101 images)" in result.stderr


def _bench_train_json(tmp_path, name, *extra, data=None, launcher_processes=0):
    args = [
        "bench",
        "train",
        "--config",
        "configs/demo.yaml",
        "--steps",
        "3",
        "--warmup",
        "2",
        "--run-dir",
        str(tmp_path / f"run-{name}"),
        "--json",
        str(tmp_path / f"{name}.json"),
        *extra,
        *([f"data.path={data}"] if data else []),
    ]  # flags first: overrides are the trailing positionals
    if launcher_processes:
        result = accelerate_launch(launcher_processes, ["-m", "distvit.cli", *args], script=None)
    else:
        result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_bench_train_with_the_lesson_baseline_on_the_real_data_path(small_dataset, tmp_path):
    """The smoke test of `distvit bench train --baseline lesson`: every number produced and sane."""
    result, report = _bench_train_json(
        tmp_path, "p16", "--baseline", "lesson", "train.batch_size=32", data=small_dataset
    )
    distvit, lesson = report["results"]
    assert (distvit["name"], lesson["name"]) == ("distvit", "lesson") and report["world_size"] == 1
    assert report["tokens_per_image"] == 5 and report["mixed_precision"] == "no"  # CPU: auto is fp32
    # deit_tiny's 5.5M weights x 5 tokens x 2 (multiply-add) x 3 (forward + two backward matmuls)
    assert 0.12 < report["train_gflops_per_image"] < 0.2, report["train_gflops_per_image"]
    for m in (distvit, lesson):
        assert m["steps"] == 3 and m["images_per_sec"] > 0 and m["peak_memory_bytes"] > 0
        assert m["step_ms"] == pytest.approx(1000 * 32 / m["images_per_sec"], rel=1e-6)
        phases = m["phase_fractions"]
        assert phases["data"] + phases["forward_backward"] + phases["optimizer"] == pytest.approx(1.0)  # the step
        assert 0 <= phases["augment"] <= phases["data"]  # the device-side inputs, a part of data
        assert m["achieved_tflops"] == pytest.approx(m["images_per_sec"] * report["train_gflops_per_image"] / 1000)
        assert 0 < m["peak_fraction"] < 1.5
    assert lesson["ratio_to_lesson"] == 1.0 and lesson["phase_fractions"]["augment"] == 0
    assert distvit["phase_fractions"]["augment"] > 0  # crop_flip, timed apart from the fetch
    assert distvit["ratio_to_lesson"] == pytest.approx(distvit["images_per_sec"] / lesson["images_per_sec"])
    assert "x lesson" in result.stdout and "process peak RSS" in result.stdout


@pytest.mark.slow
def test_bench_train_counts_patch4_tokens_and_flops(tmp_path):
    _, p4 = _bench_train_json(tmp_path, "p4", "--synthetic", "64", "surgery.patch_size=4", "train.batch_size=16")
    assert p4["tokens_per_image"] == 65 and p4["config"]["data"]["path"] == "data/synthetic-demo"
    assert 1.8 < p4["train_gflops_per_image"] < 2.6  # ~13x the 5-token model: 64 patches + class token


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_train_on_two_ranks_reports_scaling(tmp_path):
    _bench_train_json(tmp_path, "one", "--synthetic", "400", "train.batch_size=32")
    result, two = _bench_train_json(
        tmp_path,
        "two",
        "--synthetic",
        "400",
        "train.batch_size=64",
        "--scaling-reference",
        str(tmp_path / "one.json"),
        launcher_processes=2,
    )
    assert two["world_size"] == 2 and two["results"][0]["steps"] == 3
    assert "scaling: 2 process(es)" in result.stdout and "efficiency" in result.stdout


TINY = ["--synthetic", "200", "--steps", "2", "--warmup", "1"]
TINY_OVERRIDES = ["surgery.img_size=32", "train.batch_size=16", "train.compile=false"]


@pytest.mark.slow
def test_bench_train_epoch_of_the_head_only_lesson_on_cached_features(tmp_path):
    """`--epoch`: the lesson's first experiment end to end: the feature pass plus exactly one epoch's
    steps (200 images: 12 batches of 16 and one of 8) against the lesson's 200 // 16 batches of 16."""
    head_only = ["surgery.freeze=backbone", "augment.preset=none", *TINY_OVERRIDES]
    result, report = _bench_train_json(tmp_path, "epoch", *TINY, "--epoch", "--baseline", "lesson", *head_only)
    epoch = report["epoch"]
    assert epoch["images"] == 200 and epoch["steps"] == 13  # every training image once, the last batch of 8
    assert epoch["feature_seconds"] > 0 and epoch["feature_seconds"] == report["feature_cache_seconds"]
    assert epoch["distvit_seconds"] == pytest.approx(epoch["feature_seconds"] + epoch["steps_seconds"])
    assert epoch["distvit_images_per_sec"] == pytest.approx(200 / epoch["distvit_seconds"])
    assert epoch["lesson_steps"] == 12 and epoch["lesson_images"] == 12 * 16  # len(loader), drop_last
    assert epoch["lesson_images_per_sec"] == pytest.approx(192 / epoch["lesson_seconds"])
    assert epoch["ratio"] == pytest.approx(epoch["lesson_seconds"] / epoch["distvit_seconds"])
    assert report["profile"] is None
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("one epoch")]
    assert line.startswith(
        f"one epoch of 200 images end to end: distvit {epoch['distvit_seconds']:.2f} s "
        f"(features {epoch['feature_seconds']:.2f} s + steps {epoch['steps_seconds']:.2f} s), "
        f"lesson {epoch['lesson_seconds']:.2f} s (192 images: its loader drops the last partial batch): "
    ) and line.endswith(("x faster", "x slower"))


@pytest.mark.slow
def test_bench_train_epoch_and_profile_of_full_fine_tuning(tmp_path):
    """Without cached features the epoch is its steps alone; `--profile` writes torch's table of the
    profiled steps' ops (CPU: by self CPU time) and puts the headline numbers into the JSON."""
    profile = tmp_path / "profile.txt"
    result, report = _bench_train_json(tmp_path, "full", *TINY, "--epoch", "--profile", str(profile), *TINY_OVERRIDES)
    epoch = report["epoch"]
    assert report["feature_cache_seconds"] == 0 and epoch["feature_seconds"] == 0
    assert epoch["images"] == 200 and epoch["steps"] == 13 and epoch["distvit_seconds"] == epoch["steps_seconds"]
    assert "lesson_seconds" not in epoch and "ratio" not in epoch
    assert f"one epoch of 200 images end to end: distvit {epoch['distvit_seconds']:.2f} s (features 0.00 s" in (
        result.stdout
    )
    summary = report["profile"]
    assert summary["steps"] == 5 and summary["path"] == str(profile) and "error" not in summary
    assert summary["device_busy_fraction"] is None and summary["sorted_by"] == "self CPU time"
    assert 0 < summary["window_seconds"] < 60 and len(summary["top"]) == 5
    assert all(0 < top["share"] < 1 and top["ms"] > 0 for top in summary["top"])
    assert sorted((t["share"] for t in summary["top"]), reverse=True) == [t["share"] for t in summary["top"]]
    text = profile.read_text()
    assert text.splitlines()[1].startswith("window: ") and "for 5 steps" in text.splitlines()[1]
    assert "Self CPU time total:" in text and "aten::addmm" in text and "aten::mm" in text  # the Linear layers
    assert {"aten::addmm", "aten::mm"} & {top["name"] for top in summary["top"]}
    assert "Optimizer.step#AdamW.step" in text  # the fused AdamW step, as torch labels it
    assert f"(table in {profile})" in result.stdout


@pytest.mark.parametrize("where", ["missing/profile.txt", "."])
def test_bench_train_profile_needs_a_file_in_an_existing_folder(tmp_path, capsys, where):
    from distvit.cli import main

    target = tmp_path / where
    args = ["bench", "train", "--config", "configs/demo.yaml", "--synthetic", "40", "--profile", str(target)]
    status = main([*args, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"distvit: error: --profile {target}: ")
    assert ("does not exist" if where != "." else "is a folder") in err
    assert not (tmp_path / "r").exists()  # refused before the benchmark started


def test_bench_train_lesson_baseline_needs_one_process(tmp_path, monkeypatch, capsys):
    from distvit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    status = main(
        [
            "bench",
            "train",
            "--config",
            "configs/demo.yaml",
            "--synthetic",
            "40",
            "--baseline",
            "lesson",
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    assert status == 2 and "--baseline lesson compares with the lesson's single-process loop" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_fast_path_check_fails_when_the_fast_path_trains_differently(small_dataset, tmp_path):
    """`--check` is a real comparison: bf16 on this CPU passes; a fast path whose lr is off fails."""
    from accelerate.state import AcceleratorState

    from distvit.config import load_config
    from distvit.data.manifest import read_manifest
    from distvit.engine.trainer import Trainer
    from distvit.tools.fast_path import check_fast_path

    def check(tamper, *overrides):
        AcceleratorState._reset_state(True)  # another precision than earlier tests' Accelerators in this process
        cfg = load_config(
            REPO / "configs/demo.yaml",
            [
                f"data.path={small_dataset}",
                f"run.dir={tmp_path}",
                "tracking.backend=none",
                "train.batch_size=32",
                "optim.warmup_epochs=0",
                *overrides,
            ],
        )
        trainer = Trainer(cfg, read_manifest(small_dataset))
        try:
            for group in trainer.parts.optimizer.param_groups:
                group["lr"] *= tamper
            return check_fast_path(trainer, steps=4)
        finally:
            trainer.stops.close()
            AcceleratorState._reset_state(True)

    bf16 = check(1, "train.mixed_precision=bf16")
    assert bf16["passed"] and 0 < bf16["logit_error"] < bf16["logit_tolerance"], bf16
    assert 0 < bf16["update_error"] < bf16["update_tolerance"], bf16
    too_fast = check(30)
    assert not too_fast["passed"] and too_fast["loss_error"] > too_fast["loss_tolerance"], too_fast
    no_update = check(1e-6)  # the losses barely move apart in 4 steps; the weights do
    assert not no_update["passed"] and no_update["update_error"] > no_update["update_tolerance"], no_update


BLOCK_OPTIONAL = "import sys\nfor name in ('pydantic', 'webdataset', 'wandb'):\n    sys.modules[name] = None\n"


@pytest.mark.slow
def test_gpu_check_script_runs_with_only_torch_timm_accelerate(tmp_path):
    """launch/gpu_check.py at tiny size, with pydantic, webdataset and wandb made unimportable: the phases
    that read shards say they were skipped and why; every benchmark phase reports."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_OPTIONAL)
    env = {**subprocess_env(), "PYTHONPATH": str(blocker)}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "launch/gpu_check.py", str(out), "--quick", "--budget", "900"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pydantic is not installed" in (out / "gpu_check.log").read_text()  # the blocker did block
    cases = json.loads((out / "gpu_check.json").read_text())
    assert [c["name"] for c in cases] == [
        "deit_tiny 224/p16",
        "deit_tiny 32/p4",
        "CUDA paths (gpu_paths.py)",
        "data readers (bench data)",
        "decoding at 224 px (bench decode)",
        "deit_tiny 224/p16, DeiT augmentation",
        "lesson exp. 1: head only 224",
        "deit_tiny 32/p16",
        "deit_small 224/p16",
    ]
    benches = [c for c in cases if "results" in c]
    assert len(benches) == 6 and all([m["name"] for m in c["results"]] == ["distvit", "lesson"] for c in benches)
    for skipped in cases[2:5]:
        assert skipped["skipped"] == "webdataset is not installed (carry its wheel and braceexpand's)"
    assert cases[0]["check"]["passed"] and cases[1]["tokens_per_image"] == 65
    assert [c["profile"]["steps"] for c in cases[:2]] == [5, 5] and cases[7]["profile"] is None
    assert cases[5]["results"][0]["phase_fractions"]["augment"] > 0  # DeiT's augmentation, timed apart
    head_only = cases[6]
    assert head_only["epoch"]["images"] == 200 and head_only["epoch"]["feature_seconds"] > 0
    table = (out / "gpu_check.md").read_text()
    assert table.count("| distvit |") == 6 and table.count("| lesson |") == 6 and "**PASS**" in table
    assert "- lesson exp. 1: head only 224: 200 images, distvit " in table
    assert table.count("skipped: webdataset is not installed") == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
        "gpu_profiles.txt",
    ]
    profiles = (out / "gpu_profiles.txt").read_text()
    assert profiles.count("distvit bench train --profile:") == 2 and "## deit_tiny 32/p4" in profiles


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_paths_script_checks_the_paths_on_this_machine(tmp_path):
    """launch/gpu_paths.py --quick on the CPU (gloo): every check that needs no CUDA runs and passes with
    exact numbers; fp16 loss scaling is skipped, said so."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "launch/gpu_paths.py", str(out), "--quick"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_paths.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == [
        "compile_ddp_accum",
        "one_vs_two_ranks",
        "stop_resume_bf16",
        "fp16_overflow",
        "eval_one_vs_two",
    ]
    assert [c["passed"] for c in checks.values()] == [True, True, True, None, True]
    compiled = checks["compile_ddp_accum"]["numbers"]
    assert compiled["steps_checked_per_rank"] == [4, 4] and compiled["compile_seconds"] > 0  # 256 images / 64
    ranks = checks["one_vs_two_ranks"]["numbers"]
    assert ranks["steps"] == 16 and ranks["max_weight_diff"] < 1e-5 and ranks["max_loss_diff"] < 1e-5
    resume = checks["stop_resume_bf16"]["numbers"]
    assert resume["steps"] == [16, 16] and set(resume["resumed_vs_full"].values()) == {0.0}
    assert set(resume["resumed_vs_full"]) == {"model", "ema", "optimizer"}
    evaluation = checks["eval_one_vs_two"]["numbers"]
    assert evaluation["num_samples"] == [67, 67] and evaluation["correct"][0] == evaluation["correct"][1]
    assert "| fp16_overflow | skipped | fp16 loss scaling needs CUDA |" in (out / "gpu_paths.md").read_text()


def test_gpu_paths_checks_fail_on_what_they_look_for(tmp_path):
    """The paths script's judges are real: a changed weight, an unskipped overflow step, a differing
    scaler or evaluation count each fail."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import gpu_paths
    finally:
        sys.path.remove(str(REPO / "launch"))
    state = {"model": {"w": torch.zeros(3)}, "ema": None, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}
    moved = {**state, "model": {"w": torch.tensor([0.0, 0.5, 0.0])}}
    assert gpu_paths._state_diffs(state, state) == {"model": 0.0, "optimizer": 0.0}
    assert gpu_paths._state_diffs(state, moved) == {"model": 0.5, "optimizer": 0.0}

    skipped = {"step": 3, "weights_changed": False, "scale_before": 65536.0, "scale_after": 32768.0}
    skipped |= {"scheduler_steps_before": 2, "scheduler_steps_after": 2}
    scaler = {"scale": 32768.0, "_growth_tracker": 29}
    judge = gpu_paths.fp16_extra([{"rank": 0, "overflow": skipped}])
    assert judge({"scaler": scaler}, {"scaler": dict(scaler)}, True, "", {})[0] is True
    for bad in ({"weights_changed": True}, {"scale_after": 65536.0}, {"scheduler_steps_after": 3}):
        judge = gpu_paths.fp16_extra([{"rank": 0, "overflow": {**skipped, **bad}}])
        assert judge({"scaler": scaler}, {"scaler": scaler}, True, "", {})[0] is False, bad
    judge = gpu_paths.fp16_extra([{"rank": 0, "overflow": skipped}])
    passed, text = judge({"scaler": scaler}, {"scaler": {**scaler, "_growth_tracker": 3}}, True, "", {})
    assert passed is False and "scaler state after resume DIFFERENT" in text
    assert gpu_paths.fp16_extra([{"rank": 0}])({}, {}, True, "", {})[0] is False  # the overflow never ran

    result = {"correct": 43, "num_samples": 333, "confusion": [[1, 0], [0, 1]], "per_class_accuracy": [1.0, 1.0]}
    for ranks, correct in ((1, 43), (2, 42)):
        (tmp_path / f"eval{ranks}.json").write_text(json.dumps({**result, "correct": correct}))
    one, two = (gpu_paths.Launch(f"eval{r}", r, [], exit=0) for r in (1, 2))
    check = gpu_paths.check_eval(one, two, tmp_path)
    assert check.passed is False and check.summary.endswith("['correct'] differ")
    two.exit = 1
    assert gpu_paths.check_eval(one, two, tmp_path).summary == "eval2 exit 1"


def test_bench_preflight_times_serial_parallel_and_a_requeue():
    result = run_cli(["bench", "preflight", "--shards", "30", "--shard-mb", "0.2", "--workers", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("distvit bench preflight: 30 shards of 0.2 MB (0.01 GB)")
    rows = {line[:32].strip(): line[32:].split() for line in lines[2:]}
    assert list(rows) == ["serial (1 thread)", "parallel (2 threads)", "requeue (all verified before)"]
    # (a requeue of 30 small shards can take under a millisecond: its seconds may print as 0.000)
    assert rows["serial (1 thread)"][2] == "1.0" and all(float(row[1]) > 0 for row in rows.values())
    assert "--shards" in run_cli(["bench", "preflight", "--shards", "0"]).stderr


def test_bench_decode_times_raw_decoders_and_each_reader_per_core(tmp_path):
    from distvit.data.node import usable_cores

    out = tmp_path / "decode.json"
    args = ["bench", "decode", "--images", "96", "--stored-size", "32", "--batch-size", "16", "--steps", "3"]
    result = run_cli([*args, "--json", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "libjpeg-turbo (torch), JPEG" in result.stdout and "distvit stream, JPEG shards" in result.stdout
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["raw"]] == ["Pillow, PNG", "Pillow, JPEG", "libjpeg-turbo (torch), JPEG"]
    workers = sorted({0, 1, usable_cores()})
    assert [(r["name"].split(",")[0], r["workers"]) for r in report["pipelines"]] == [
        (name, w)
        for w in workers
        for name in ("lesson-style: PIL + ToTensor + Normalize", "distvit stream", "distvit stream")
    ]
    assert all(r["images_per_sec"] > 0 for r in report["raw"] + report["pipelines"])
    png, jpeg = report["raw"][0]["bytes_per_image"], report["raw"][1]["bytes_per_image"]
    assert jpeg < png  # the same images, stored both ways
    refused = run_cli(["bench", "decode", "--images", "10", "--batch-size", "16"])
    assert refused.returncode == 2 and "raise --images" in refused.stderr
    _check_gpu_check_decode_lines(report)


def _check_gpu_check_decode_lines(report: dict) -> None:
    """launch/gpu_check.py's decode section from a real report, and its verdict on a GPU row either side
    of the 25k img/s target."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "launch"))
    lines = gpu_check._decode_lines({"name": gpu_check.DECODE, "exit": 0, "decode": report})
    jpeg_rows = [line for line in lines if "distvit stream, JPEG shards" in line]
    assert len(jpeg_rows) == len(report["pipelines"]) // 3 and all("of raw" in line for line in jpeg_rows)
    assert not any("GPU" in line for line in lines)  # no GPU here: no verdict to give
    for rate, verdict in ((25_000.0, "**met**"), (24_999.0, "**MISSED**")):
        gpu_row = {"name": "distvit stream, JPEG decoded on the GPU", "workers": 8, "images_per_sec": rate}
        on_gpu = {**report, "pipelines": [*report["pipelines"], {**gpu_row, "bytes_per_image": 1.0}]}
        last = gpu_check._decode_lines({"name": gpu_check.DECODE, "exit": 0, "decode": on_gpu})[-1]
        assert last == f"- JPEG decoded on the GPU, best {rate:,.0f} img/s: {verdict}: >= 25,000"


@pytest.mark.slow
def test_augment_proxy_script_prints_one_row_per_pipeline(tmp_path):
    """launch/augment_proxy.py at tiny size on the generated digits: the five pipelines, each trained."""
    result = subprocess.run(
        [sys.executable, "launch/augment_proxy.py", "--data", "generated", "--seeds", "1", "--epochs", "1"]
        + ["--train-size", "100", "--test-size", "20", "--out", str(tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = result.stdout.strip().splitlines()
    assert rows[0] == "| pipeline (generated digits, 1 epochs, 1 seeds) | mean accuracy | min..max | per seed |"
    assert [row.split(" | ")[0] for row in rows[2:]] == [
        "| none",
        "| crop_flip (distvit's default)",
        "| padded crop, no flip (crop_flip with augment.hflip=0)",
        "| padded crop + RandAugment m9 + erasing 0.25, no flip",
        "| the same with flips (p=0.5)",
    ]
    for run in ("0-seed0", "4-seed0"):
        start = (tmp_path / "runs" / run / "summary.json").read_text()
        assert '"accuracy"' in start


@pytest.mark.slow
def test_gpu_check_peer_phase_runs_timms_scripts_quick(tmp_path, monkeypatch):
    """launch/gpu_check.py --quick --peer with timm's own benchmark.py and train.py (launch/peer/timm, from
    launch/get_timm_scripts.sh) run for real at tiny sizes on this machine; distvit's cases stand in as
    recorded ones (the other gpu_check test runs them). Every timm rate is parsed and positive, and the
    report has the side-by-side rows with their verdicts."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import gpu_check
        import gpu_peer
    finally:
        sys.path.remove(str(REPO / "launch"))
    from tests.unit.test_gpu_peer import _distvit_case

    if gpu_peer.missing():
        pytest.skip(gpu_peer.missing())
    peer_cases = {"deit_tiny 224/p16": 40.0, "deit_tiny 32/p4": 5.0, "deit_small 224/p16": 3.0}

    def recorded(name, *args):
        if name in peer_cases:
            return _distvit_case(name, peer_cases[name], 16, precision="no")
        return {"name": name, "skipped": "not run in this test"}

    monkeypatch.setattr(gpu_check, "run_case", recorded)
    for phase in ("run_paths", "run_readers", "run_decode"):
        monkeypatch.setattr(gpu_check, phase, lambda *args, phase=phase: {"name": phase, "skipped": "not run"})
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", str(out), "--quick", "--peer", "--budget", "600"])
    assert gpu_check.main() == 0, (out / "gpu_check.log").read_text()[-3000:]
    cases = json.loads((out / "gpu_check.json").read_text())
    names = [c["name"] for c in cases]
    assert names[:5] == ["deit_tiny 224/p16", "deit_tiny 32/p4", "deit_small 224/p16", gpu_peer.BENCH, gpu_peer.TRAIN]
    bench, train = cases[3], cases[4]
    assert bench["exit"] == 0 and bench["device"] == "cpu" and [r["case"] for r in bench["rows"]] == list(peer_cases)
    for row in bench["rows"]:
        assert row["images_per_sec"] > 0 and row["step_ms"] > 0, row
        assert (row["batch_size"], row["img_size"], row["fused_adamw"]) == (8, 32, True), row
    assert "img_size=32 patch_size=4" in bench["rows"][1]["command"]
    assert train["exit"] == 0 and train["images_per_sec"] > 0 and train["fused_adamw"] is True, train
    assert (train["train_images"], train["timed"], train["steps_timed"]) == (64, "epoch 0, steps 1+", 7)
    assert train["val_top1"] is not None and train["source"]["files_as_copied"], train
    table = (out / "gpu_check.md").read_text()
    peer = table.split("## Side by side with timm\n")[1]
    rows = [line for line in peer.splitlines() if line.startswith("| deit")]
    assert [row.split(" | ")[0] for row in rows] == [f"| {c}" for c in peer_cases] + ["| deit_tiny 224/p16"]
    for row, target in zip(rows, ["1", "1", "1", "3"]):
        cells = row.split(" | ")
        assert cells[2] == "fp32, 16" and cells[5].startswith("fp32, eager, fused AdamW, 8"), row
        assert cells[6].endswith("x") and cells[7] == f">= {target}x" and cells[8] in ("met |", "MISSED |"), row
    assert "On a CPU (--quick)" in peer and "train.py end to end (64 PNGs)" in peer
    assert "--run-timm" in (out / "gpu_check.log").read_text()
