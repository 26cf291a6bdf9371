"""Stops and resumes end to end: stop on request and exact resume (1 and 2 ranks, mid-epoch, onto another
world size), W&B run continuity, checkpoint retention, refused and finished resumes."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from distvit.run.checkpoint_files import load_checkpoint
from distvit.run.rundir import read_summary
from distvit.run.tracking import read_metrics
from tests.support.helpers import accelerate_launch, launch_ok, launch_until_logged, run_cli, trace_ids, worker_pids
from tests.support.wandb_records import summarize

pytestmark = [pytest.mark.slow]

ALL_FEATURES = [
    "train.epochs=2",
    "train.batch_size=32",
    "eval.batch_size=64",
    "train.log_every=2",
    "ema.enabled=true",
    "mix.mixup_alpha=0.8",
    "mix.cutmix_alpha=1.0",
    "train.label_smoothing=0.1",
    "optim.clip_grad_norm=1.0",
    "train.grad_accum_steps=2",
    "surgery.drop_path=0.1",
    "optim.fused=true",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=1",
    "checkpoint.stop_check_every=5",
    "run.overwrite=false",
]


def assert_same_state(a, b, tolerance=0.0):
    for key in ("model", "ema"):
        worst = max((a[key][k] - b[key][k]).abs().max().item() for k in a[key])
        assert worst <= tolerance, f"{key} differs by {worst}"
    moments = [(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]) for i, s in a["optimizer"]["state"].items()]
    assert max((x - y).abs().max().item() for x, y in moments) <= tolerance


def test_stop_file_then_exact_resume_on_one_rank(small_dataset, tmp_path):
    """Every training feature on; a STOP file stops the run at the first check (step 5, mid-epoch); the
    resumed run ends bit-equal to an uninterrupted one: weights, EMA and optimizer moments. W&B (offline)
    continues the same run id."""
    common = [
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        *ALL_FEATURES,
        "tracking.mode=offline",
    ]
    full = tmp_path / "full"
    assert run_cli([*common, f"run.dir={full}"]).returncode == 0
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "STOP").touch()
    stopped = run_cli([*common, f"run.dir={cut}"])
    assert stopped.returncode == 3, stopped.stderr[-2000:]  # EXIT_STOPPED
    assert "stopped after step 5 (STOP file)" in stopped.stdout
    assert json.loads((cut / "stopped.json").read_text())["step"] == 5
    assert not (cut / "STOP").exists() and not (cut / "summary.json").exists()
    assert json.loads((cut / "checkpoints" / "latest.json").read_text())["file"] == "step_00000005.pt"

    resumed = run_cli([*common, f"run.dir={cut}", "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and not (cut / "stopped.json").exists()
    a, b = load_checkpoint(full), load_checkpoint(cut)
    assert a["step"] == b["step"] == 14
    assert_same_state(a, b)

    # keep_last=1: one periodic checkpoint (step 12) besides best and final
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [
        "best.pt",
        "final.pt",
        "latest.json",
        "step_00000012.pt",
    ]
    summary = read_summary(full)
    best = load_checkpoint(full / "checkpoints" / "best.pt")
    assert (
        best["best_score"]
        == summary["best_score"]
        == max(r["ema_accuracy"] for r in read_metrics(full) if r["split"] == "test")
    )
    assert summary["export"]["weights"] in ("model", "ema") and (full / "model.safetensors").is_file()
    assert sorted(p.name for p in (full / "plots").iterdir()) == [
        "accuracy.png",
        "confusion.png",
        "confusion_ema.png",
        "loss.png",
        "lr.png",
    ]

    # W&B: one offline run directory per job, both with the run id kept in tracker.json and the checkpoint
    run_id = json.loads((cut / "tracker.json").read_text())["wandb_run_id"]
    assert b["tracker"]["wandb_run_id"] == run_id
    runs = sorted((cut / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    first, second = (summarize(r) for r in runs)
    assert first["run_id"] == second["run_id"] == run_id
    assert {"ema", "optim", "surgery", "effective_lr"} <= first["config"]
    logged = [[int(h["step"]) for h in s["history"] if "train/loss" in h] for s in (first, second)]
    assert logged == [[2, 4], [6, 7, 8, 10, 12, 14]]  # no step lost or logged twice across the stop
    assert any("test/ema_accuracy" in h for h in second["history"])
    assert any("test/per_class_accuracy/rings" in h for h in second["history"])


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_exact_resume_with_every_augmentation_part_on(small_dataset, tmp_path, world):
    """DeiT's recipe (random-resized crop, flip, RandAugment, erasing, repeats) plus colour jitter and
    mixing: a run stopped mid-epoch and resumed ends bit-equal to an uninterrupted one, on 1 and 2 ranks."""
    common = [
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        "augment.preset=deit",
        "augment.color_jitter=0.4",
        "augment.repeats=2",
        "mix.mixup_alpha=0.8",
        "mix.cutmix_alpha=1.0",
        "ema.enabled=true",
        "train.epochs=2",
        "train.batch_size=32",
        "eval.batch_size=64",
        "tracking.backend=none",
    ]
    launch_ok(world, [*common, f"run.dir={tmp_path}/full"])
    cut = tmp_path / "cut"
    launch_ok(world, [*common, f"run.dir={cut}", "train.stop_at_step=16"])  # 3 steps into epoch 2 of 13
    result = launch_ok(world, [*common, f"run.dir={cut}", "train.resume=auto"])
    assert "resumed from" in result.stdout and "at step 16" in result.stdout
    assert "augmentation: horizontal flip p=0.5 -> random-resized crop" in result.stdout
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(cut)
    assert a["step"] == b["step"] == 26
    assert_same_state(a, b)


@pytest.mark.distributed
def test_sigusr1_to_one_rank_stops_all_at_the_same_step(small_dataset, tmp_path):
    common = [
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        "train.epochs=6",
        "train.batch_size=32",
        "eval.batch_size=64",
        "train.log_every=1",
        "ema.enabled=true",
        "checkpoint.stop_check_every=2",
        "tracking.backend=none",
    ]
    full = tmp_path / "full"
    result = accelerate_launch(2, [*common, f"run.dir={full}"])
    assert result.returncode == 0, result.stderr[-3000:]

    cut = tmp_path / "cut"
    process = launch_until_logged(2, [*common, f"run.dir={cut}"], cut)
    workers = worker_pids(process.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGUSR1)  # rank 1 only: rank 0 learns of it through the all-reduce
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0  # the launcher reports the ranks' EXIT_STOPPED (3) as a failure
    stopped = json.loads((cut / "stopped.json").read_text())
    assert stopped["reason"] == "SIGUSR1"  # rank 0 (the writer) got no signal itself: the reason is agreed too
    step = stopped["step"]
    assert step % 2 == 0 and 3 <= step < 42, stopped
    assert load_checkpoint(cut / "checkpoints" / f"step_{step:08d}.pt")["step"] == step

    result = accelerate_launch(2, [*common, f"run.dir={cut}", "train.resume=auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_state(load_checkpoint(full), load_checkpoint(cut))


def test_resuming_a_finished_run_changes_nothing(small_dataset, tmp_path):
    """A requeued job whose run already finished: exit 0, a message, the run directory untouched. One that
    was killed between its final checkpoint and its outputs is not finished: resuming writes them."""
    args = [
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        f"run.dir={tmp_path}/r",
        "train.batch_size=50",
        "tracking.backend=none",
    ]
    assert run_cli(args).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    again = run_cli([*args, "train.resume=auto"])
    assert again.returncode == 0 and "nothing to resume" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before

    # killed after final.pt, before the export and summary.json: not finished; resuming writes only those
    for name in ("summary.json", "model.safetensors", "model.json"):
        (tmp_path / "r" / name).unlink()
    final = (tmp_path / "r" / "checkpoints" / "final.pt").read_bytes()
    completed = run_cli([*args, "train.resume=auto"])
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "nothing to resume" not in completed.stderr and "epoch 1:" not in completed.stdout  # trained nothing
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    assert after["metrics.jsonl"] == before["metrics.jsonl"]
    # the same exported weights (not the same bytes: safetensors orders its metadata differently per process)
    from safetensors.torch import load

    old_weights, new_weights = load(before["model.safetensors"]), load(after["model.safetensors"])
    assert old_weights.keys() == new_weights.keys() and all(
        torch.equal(old_weights[k], new_weights[k]) for k in old_weights
    )
    assert json.loads(after["model.json"]) == json.loads(before["model.json"])
    summary, earlier = json.loads(after["summary.json"]), json.loads(before["summary.json"])
    assert summary["finished"] is True and summary["final"] == earlier["final"] and summary["steps"] == earlier["steps"]
    assert (tmp_path / "r" / "checkpoints" / "final.pt").read_bytes() == final


def test_stop_request_wins_over_a_planned_stop_at_the_same_step(small_dataset, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    result = run_cli(
        [
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "run.overwrite=false",
            "train.batch_size=20",
            "train.stop_at_step=5",
            "checkpoint.stop_check_every=5",
            "tracking.backend=none",
        ]
    )
    assert result.returncode == 3 and "stopped after step 5 (STOP file)" in result.stdout
    assert not (run_dir / "STOP").exists()  # consumed: the resumed run does not stop again at once


@pytest.mark.distributed
@pytest.mark.parametrize("resume_world", [2, 1])
def test_resume_mid_epoch_with_same_or_other_world_size(small_dataset, tmp_path, resume_world):
    """Stop after step 10 (3 steps into epoch 2 of 7-step epochs) on 2 ranks, resume on `resume_world`:
    every sample of each epoch trained on exactly once, and the final weights match an uninterrupted
    2-rank run (measured: bit-equal for 2 -> 2, 7.5e-9 for 2 -> 1)."""
    common = [
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        "data.trace_samples=true",
        "train.epochs=2",
        "train.batch_size=32",
        "eval.batch_size=64",
        "optim.name=sgd",
        "optim.lr=0.05",
        "train.mixed_precision=no",
        "tracking.backend=none",
    ]
    launch_ok(2, [*common, f"run.dir={tmp_path}/full"])
    cut = tmp_path / "cut"
    launch_ok(2, [*common, f"run.dir={cut}", "train.stop_at_step=10"])
    assert not (cut / "summary.json").exists()
    assert json.loads((cut / "checkpoints" / "latest.json").read_text()) == {
        "file": "step_00000010.pt",
        "step": 10,
        "epoch": 1,
    }
    assert sorted(len(v) for v in trace_ids(cut).values()) == [3 * 32, 200]  # epoch 2 stopped after 3 steps

    result = launch_ok(resume_world, [*common, f"run.dir={cut}", "train.resume=auto"])
    assert "resumed from" in result.stdout and "at step 10" in result.stdout
    for epoch, ids in trace_ids(cut).items():
        assert sorted(ids) == list(range(200)), f"epoch {epoch}: samples missed or repeated"
    full, resumed = load_checkpoint(tmp_path / "full"), load_checkpoint(cut)
    assert full["step"] == resumed["step"] == 14
    difference = max((full["model"][k] - resumed["model"][k]).abs().max().item() for k in full["model"])
    assert difference < (1e-6 if resume_world == 2 else 1e-5)
    steps = [r["step"] for r in read_metrics(cut) if r["split"] == "train"]
    assert steps == sorted(set(steps))  # no step logged twice across the stop


@pytest.mark.distributed
def test_resume_refuses_a_checkpoint_of_another_run(small_dataset, tmp_path):
    base = [
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        f"run.dir={tmp_path}/r",
        "train.batch_size=50",
        "tracking.backend=none",
    ]
    assert run_cli([*base, "train.stop_at_step=2"]).returncode == 0
    before = {name: (tmp_path / "r" / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    result = run_cli([*base, "train.resume=auto", "train.seed=1"])
    assert result.returncode == 2 and "train.seed is 1, the stopped run's was 0. Every epoch's sample" in result.stderr
    result = run_cli([*base, "train.resume=auto", "surgery.patch_size=8"])
    assert result.returncode == 2 and "cannot resume from" in result.stderr and "'patch_size': 16" in result.stderr
    result = run_cli([*base, "run.overwrite=false"])  # demo.yaml itself allows overwriting
    assert result.returncode == 2 and "Continue it with train.resume=auto" in result.stderr
    assert "Traceback" not in result.stderr
    # refused resumes changed nothing in the run directory
    assert {name: (tmp_path / "r" / name).read_bytes() for name in before} == before
