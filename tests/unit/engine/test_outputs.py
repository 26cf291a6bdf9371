"""distvit.engine.outputs: the start line, the summary of a run, and what a stopped or finished run leaves
(stopped.json or summary.json and the exported weights; a STOP file consumed by a requested stop or a finished run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distvit.engine.stopping import PLANNED_STOP
from tests.support.trainers import open_trainer


def _trainable(trainer) -> int:
    return sum(p.numel() for p in trainer.parts.model.parameters() if p.requires_grad)


def summary_of(trainer, finished: bool, stop_reason: str | None, checkpoint) -> dict:
    """The summary a run of `trainer` writes, with no cached features and no shard cache."""
    return trainer.outputs.summary(
        finished=finished,
        stop_reason=stop_reason,
        checkpoint=checkpoint,
        state=trainer.state,
        step=trainer.step,
        meter=trainer.meter,
        feature_seconds=None,
    )


def test_start_line_describes_the_run(small_dataset, tmp_path):
    run_dir = tmp_path / "r"
    with open_trainer(small_dataset, run_dir, "ema.horizon=0.5") as trainer:
        line = trainer.outputs.start_line(trainer.sources, False, None, 0)
        resumed = trainer.outputs.start_line(trainer.sources, True, Path("old/step_00000007.pt"), 7)
        fused = ", fused attention" if trainer.parts.fused_attn else ""
    # 200 images / batch 50 = 4 steps per epoch; EMA horizon 0.5 of 2 x 4 steps: 1 - 1/4 = 0.75
    assert line == (
        "distvit: 1 process(es) on NO (cpu), mixed precision no; deit_tiny_patch16_224 at 32px/patch 16 "
        f"(5 tokens, {_trainable(trainer):,} trainable params); 200 train / 101 test images, 4 steps/epoch of 50; "
        "data in memory; augmentation: random crop (zero padding 4 px) -> horizontal flip p=0.5; "
        f"effective peak lr 0.001; EMA decay 0.750000{fused}; run dir {run_dir}"
    )
    assert resumed == line.replace(f"{fused};", f"{fused}, DDP static graph;") + (
        "; resumed from old/step_00000007.pt at step 7"
    )


def test_start_line_with_lr_scaling_and_a_subset(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", "optim.lr_scale=linear", "data.train_subset=120") as trainer:
        line = trainer.outputs.start_line(trainer.sources, False, None, 0)
    # ceil(120 / 50) = 3 steps; linear scaling: 1e-3 x 50 / 512
    assert "; effective peak lr 9.766e-05 (optim.lr 0.001 x 0.09766, lr_scale=linear)" in line
    assert trainer.outputs.effective_lr() == pytest.approx(1e-3 * 50 / 512)
    assert "; 120 train (subset of 200) / 101 test images, 3 steps/epoch of 50;" in line


@pytest.mark.parametrize(
    "overrides, reading",
    [
        (["data.mode=stream", "data.num_workers=2"], "data streamed from the shards, decoded by 2 loader worker(s)"),
        (["data.mode=stream", "data.num_workers=0"], "data streamed from the shards, decoded in the training process"),
        (["data.decode=device"], "data in memory (data.decode=device applies to stream mode only)"),
    ],
)
def test_start_line_says_how_batches_are_read(small_dataset, tmp_path, overrides, reading):
    """data.mode=auto and data.decode resolved: a setting that does not apply is said, not ignored."""
    with open_trainer(small_dataset, tmp_path / "r", *overrides) as trainer:
        line = trainer.outputs.start_line(trainer.sources, False, None, 0)
    assert f"; {reading}; augmentation:" in line


def test_summary_of_a_fresh_run(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", "ema.decay=0.9") as trainer:
        summary = summary_of(trainer, False, "STOP file", tmp_path / "r" / "c.pt")
    assert summary == {
        "finished": False,
        "stop_reason": "STOP file",
        "final": {},
        "best_score": None,  # -inf before any evaluation: JSON has no infinity
        "checkpoint": str(tmp_path / "r" / "c.pt"),
        "world_size": 1,
        "distributed_type": "NO",
        "mixed_precision": "no",
        "compute_dtype": "",
        "steps": 0,
        "epochs": 0,
        "train_seconds": 0.0,
        "train_images_per_sec": None,
        "compile_seconds": None,
        "feature_cache_seconds": None,
        "effective_lr": 1e-3,
        "ema_decay": 0.9,
        "surgery": trainer.parts.record.to_dict(),
        "data_cache": None,  # not streaming through data.cache_dir
    }
    assert summary["surgery"]["model_name"] == "deit_tiny_patch16_224" and summary["surgery"]["img_size"] == 32
    json.dumps(summary)  # summary.json must be able to hold it


@pytest.mark.parametrize("reason, consumed", [("STOP file", True), ("SIGTERM", True), (PLANNED_STOP, False)])
def test_a_stopped_run_writes_stopped_json_and_consumes_stop_only_on_request(small_dataset, tmp_path, reason, consumed):
    run_dir = tmp_path / "r"
    with open_trainer(small_dataset, run_dir, "checkpoint.export=true") as trainer:
        (run_dir / "STOP").write_text("")
        trainer.state.step, trainer.state.epoch = 3, 0
        checkpoint = run_dir / "checkpoints" / "step_00000003.pt"
        summary = summary_of(trainer, False, reason, checkpoint)
        trainer.outputs.write(summary, trainer.state, trainer.stops, trainer.checkpointer.export)
    assert json.loads((run_dir / "stopped.json").read_text()) == {
        "step": 3,
        "epoch": 0,
        "reason": reason,
        "checkpoint": str(checkpoint),
    }
    assert (run_dir / "STOP").exists() is not consumed
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.safetensors").exists()


def test_a_stop_file_with_text_ends_the_run_with_its_text_as_the_reason(small_dataset, tmp_path):
    """A sweep prunes a trial so: summary.json (not stopped.json) says why, the STOP file is consumed."""
    run_dir = tmp_path / "r"
    with open_trainer(small_dataset, run_dir, "checkpoint.export=true") as trainer:
        (run_dir / "STOP").write_text("pruned by the sweep: loss 2.3 after epoch 1\n")
        trainer.state.step, trainer.state.epoch = 3, 0
        checkpoint = run_dir / "checkpoints" / "step_00000003.pt"
        summary = summary_of(trainer, False, "STOP file", checkpoint)
        trainer.outputs.write(summary, trainer.state, trainer.stops, trainer.checkpointer.export)
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["finished"] is False and written["checkpoint"] == str(checkpoint)
    assert written["stop_reason"] == "pruned by the sweep: loss 2.3 after epoch 1"
    assert not (run_dir / "stopped.json").exists() and not (run_dir / "STOP").exists()
    assert not (run_dir / "model.safetensors").exists()  # not finished: no export


@pytest.mark.parametrize("last_eval, weights", [({"accuracy": 0.5, "ema_accuracy": 0.6}, "ema"), ({}, "model")])
def test_a_finished_run_writes_summary_and_exports_the_better_weights(small_dataset, tmp_path, last_eval, weights):
    from safetensors.torch import load_file

    run_dir = tmp_path / "r"
    with open_trainer(small_dataset, run_dir) as trainer:
        (run_dir / "STOP").write_text("")  # after the last stop check: must not stop the next run here
        with torch.no_grad():
            trainer.parts.ema.module.head.bias.fill_(7.0)  # tell the EMA's weights from the model's
        trainer.state.last_eval, trainer.state.step, trainer.state.epoch = last_eval, 8, 2
        summary = summary_of(trainer, True, None, run_dir / "checkpoints" / "final.pt")
        trainer.outputs.write(summary, trainer.state, trainer.stops, trainer.checkpointer.export)
        expected_bias = (trainer.parts.ema.module if weights == "ema" else trainer.parts.model).head.bias.clone()
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["finished"] is True and written["steps"] == 8 and written["final"] == last_eval
    assert written["export"]["weights"] == weights
    assert sorted(Path(p).name for p in written["export"]["files"]) == ["model.json", "model.safetensors"]
    exported = load_file(run_dir / "model.safetensors")
    assert torch.equal(exported["head.bias"], expected_bias)
    assert not (run_dir / "stopped.json").exists() and not (run_dir / "STOP").exists()
