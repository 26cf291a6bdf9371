"""Training features end to end: stop on request and exact resume (1 and 2 ranks), W&B run continuity,
gradient accumulation, distillation, checkpoint retention, torch.compile fallback."""

from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
import torch

from distvit.run.checkpoint import load_checkpoint, save_checkpoint
from distvit.run.rundir import read_summary
from distvit.run.tracking import read_metrics
from helpers import REPO, accelerate_launch, launch_until_logged, run_cli, worker_pids
from wandb_records import summarize

pytestmark = [pytest.mark.slow]

ALL_FEATURES = [
    "train.epochs=2", "train.batch_size=32", "train.eval_batch_size=64", "train.log_every=2",
    "ema.enabled=true", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "train.label_smoothing=0.1",
    "optim.clip_grad_norm=1.0", "train.grad_accum_steps=2", "surgery.drop_path=0.1", "optim.fused=true",
    "checkpoint.every_steps=4", "checkpoint.keep_last=1", "checkpoint.stop_check_every=5", "run.overwrite=false",
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
    common = ["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", *ALL_FEATURES, "tracking.mode=offline"]
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
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["best.pt", "final.pt", "latest.json", "step_00000012.pt"]
    summary = read_summary(full)
    best = load_checkpoint(full / "checkpoints" / "best.pt")
    assert best["best_score"] == summary["best_score"] == max(r["ema_accuracy"] for r in read_metrics(full) if r["split"] == "test")
    assert summary["export"]["weights"] in ("model", "ema") and (full / "model.safetensors").is_file()
    assert sorted(p.name for p in (full / "plots").iterdir()) == [
        "accuracy.png", "confusion.png", "confusion_ema.png", "loss.png", "lr.png"]

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


@pytest.mark.distributed
def test_sigusr1_to_one_rank_stops_all_at_the_same_step(small_dataset, tmp_path):
    common = ["--config", "configs/demo.yaml", f"data.path={small_dataset}", "train.epochs=6", "train.batch_size=32",
              "train.eval_batch_size=64", "train.log_every=1", "ema.enabled=true", "checkpoint.stop_check_every=2",
              "tracking.backend=none"]
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


def test_gradient_accumulation_matches_the_whole_batch(small_dataset, tmp_path):
    common = ["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", "optim.name=sgd", "optim.lr=0.05",
              "data.augment=none", "train.epochs=1", "train.batch_size=32", "train.mixed_precision=no",
              "tracking.backend=none"]
    for accum in (1, 4):
        assert run_cli([*common, f"run.dir={tmp_path}/a{accum}", f"train.grad_accum_steps={accum}"]).returncode == 0
    one, four = load_checkpoint(tmp_path / "a1")["model"], load_checkpoint(tmp_path / "a4")["model"]
    # 4 micro-batches of 8 sum the same per-sample gradients in another order: float rounding only
    assert max((one[k] - four[k]).abs().max().item() for k in one) < 1e-5


def test_distillation_follows_the_teacher(small_dataset, tmp_path):
    """A teacher rigged to answer class 3 always, distilled with alpha=1 (labels ignored): the student
    learns to answer 3 too. The teacher runs at 64 px, the student at 32: inputs are resized for it."""
    from distvit.config import load_config
    from distvit.model.build import build_model

    cfg = load_config(REPO / "configs/demo.yaml", [f"data.path={small_dataset}", "surgery.img_size=64"])
    teacher, record = build_model(cfg.model, cfg.surgery, 10)
    with torch.no_grad():
        teacher.head.weight.zero_()
        teacher.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10) * 8.0)
    from distvit.data.manifest import read_manifest

    classes = list(read_manifest(small_dataset).classes)
    save_checkpoint(tmp_path / "teacher.pt", {"model": teacher.state_dict(), "surgery": record.to_dict(), "classes": classes})
    result = run_cli(["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", f"run.dir={tmp_path}/s",
                      "distill.type=soft", f"distill.teacher={tmp_path}/teacher.pt", "distill.alpha=1.0",
                      "train.epochs=3", "train.batch_size=25", "tracking.backend=none"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distillation (soft)" in result.stdout
    confusion = json.loads((tmp_path / "s" / "eval" / "confusion.json").read_text())["model"]
    predicted_three = sum(row[3] for row in confusion)
    assert predicted_three >= 0.9 * 101, confusion


def test_compile_failure_falls_back_to_eager(small_dataset, tmp_path, monkeypatch):
    """torch.compile that fails at the first step: a warning, then the same training as without it."""
    import torch

    from distvit.engine.trainer import run_training
    from distvit.config import load_config
    from distvit.data.manifest import read_manifest

    class Broken(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("backend compiler failed (test)")

    monkeypatch.setattr(torch, "compile", lambda module: Broken(module))
    results = {}
    for compile_on in (True, False):
        cfg = load_config(REPO / "configs/demo.yaml", [
            f"data.path={small_dataset}", f"run.dir={tmp_path}/c{compile_on}", "train.epochs=1", "train.batch_size=50",
            "tracking.backend=none", f"train.compile={str(compile_on).lower()}", "train.mixed_precision=no"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_training(cfg, read_manifest(small_dataset))
        results[compile_on] = (load_checkpoint(tmp_path / f"c{compile_on}")["model"], [str(w.message) for w in caught])
    assert any("torch.compile failed (RuntimeError: backend compiler failed (test)); training without it on every rank" in m
               for m in results[True][1])
    assert not any("torch.compile" in m for m in results[False][1])
    a, b = results[True][0], results[False][0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_changes_nothing(small_dataset, tmp_path):
    """A requeued job whose run already finished: exit 0, a message, the run directory untouched."""
    args = ["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", f"run.dir={tmp_path}/r",
            "train.batch_size=50", "tracking.backend=none"]
    assert run_cli(args).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    again = run_cli([*args, "train.resume=auto"])
    assert again.returncode == 0 and "nothing to resume" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before


def test_stop_request_wins_over_a_planned_stop_at_the_same_step(small_dataset, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    result = run_cli(["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", f"run.dir={run_dir}",
                      "run.overwrite=false", "train.batch_size=20", "train.stop_at_step=5",
                      "checkpoint.stop_check_every=5", "tracking.backend=none"])
    assert result.returncode == 3 and "stopped after step 5 (STOP file)" in result.stdout
    assert not (run_dir / "STOP").exists()  # consumed: the resumed run does not stop again at once


def test_real_compile_matches_eager(small_dataset, tmp_path):
    """torch.compile on this CPU (a C++ toolchain is there): compiled once before training, its time
    reported apart; the trained weights agree with eager training up to kernel rounding."""
    common = ["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", "train.epochs=1",
              "train.batch_size=50", "tracking.backend=none", "train.mixed_precision=no", "data.augment=none"]
    compiled = run_cli([*common, f"run.dir={tmp_path}/c", "train.compile=true"], timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "torch.compile (" in compiled.stdout and "training without it" not in compiled.stderr
    assert run_cli([*common, f"run.dir={tmp_path}/e"]).returncode == 0
    assert read_summary(tmp_path / "c")["compile_seconds"] > 0 and read_summary(tmp_path / "e")["compile_seconds"] is None
    a, b = load_checkpoint(tmp_path / "c")["model"], load_checkpoint(tmp_path / "e")["model"]
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert difference < 1e-3, difference
