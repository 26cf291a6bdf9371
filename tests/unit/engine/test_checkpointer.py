"""distvit.engine.checkpointer: the checkpoint schema written and read in one place, when checkpoints are
due, and which checkpoints a run refuses to resume from."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from distvit.engine.checkpointer import Resume, restore_payload, to_payload
from distvit.engine.order import ResumeOrder
from distvit.engine.state import TrainState
from distvit.errors import CheckpointError, RunFinished
from distvit.run.checkpoint_files import load_checkpoint, save_checkpoint
from tests.support.trainers import open_trainer


def test_payload_round_trip_restores_every_part(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "a") as trainer:
        trainer.train_epoch()  # moves weights, Adam moments, schedule, EMA and counters
        trainer.state.best_score, trainer.state.last_eval = 0.25, {"accuracy": 0.25}
        payload = to_payload(
            parts=trainer.parts,
            state=trainer.state,
            identity=trainer.checkpointer.identity,
            order=trainer.sources.orders.settings,
            scaler=None,
            rng=[{"cpu": torch.get_rng_state()}],
            wandb_run_id="abc123",
        )
    assert payload["step"] == 4 and payload["epoch"] == 1 and payload["data"]["samples_in_epoch"] == 0
    assert payload["data"]["global_batch"] == 50 and payload["tracker"] == {"wandb_run_id": "abc123"}
    assert payload["ema_state"]["updates"] == 4 and payload["classes"] == trainer.classes
    save_checkpoint(tmp_path / "c.pt", payload)
    with open_trainer(small_dataset, tmp_path / "b") as fresh:
        expected_rng = torch.get_rng_state()
        torch.manual_seed(123)  # restore must bring back the saved stream
        state = TrainState()
        restore_payload(load_checkpoint(tmp_path / "c.pt"), fresh.parts, state, fresh.accelerator, seed=0)
        assert (
            torch.equal(torch.get_rng_state(), payload["rng"][0]["cpu"])
            and payload["rng"][0]["cpu"] is not expected_rng
        )
        assert (state.epoch, state.step, state.best_score, state.last_eval) == (1, 4, 0.25, {"accuracy": 0.25})
        saved_model = load_checkpoint(tmp_path / "c.pt")["model"]
        # the model's weights are loaded by build_parts before anything derives from them, not here
        assert not all(torch.equal(v, saved_model[k]) for k, v in fresh.parts.model.state_dict().items())
        for name, tensor in trainer.parts.ema.module.state_dict().items():
            assert torch.equal(tensor, fresh.parts.ema.module.state_dict()[name])
        assert fresh.parts.ema.updates == 4
        assert fresh.parts.scheduler.last_epoch == trainer.parts.scheduler.last_epoch == 4
        old, new = trainer.parts.optimizer.state_dict(), fresh.parts.optimizer.state_dict()
        assert old["param_groups"] == new["param_groups"]
        for index, moments in old["state"].items():
            assert torch.equal(moments["exp_avg"], new["state"][index]["exp_avg"])


def test_checkpoints_are_written_as_named_and_the_best_is_kept(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", "checkpoint.keep_last=1") as trainer:
        directory, state, checkpointer = trainer.checkpointer.directory, trainer.state, trainer.checkpointer
        written = lambda: sorted(p.name for p in directory.glob("*.pt"))  # noqa: E731
        state.step = 3
        checkpointer.save("step_00000003.pt", periodic=True)
        state.step, state.epoch = 4, 1
        checkpointer.save("step_00000004.pt")  # a stop's: nothing pruned after it
        assert written() == ["step_00000003.pt", "step_00000004.pt"]
        state.step, state.epoch = 8, 2
        checkpointer.save("epoch_002.pt", periodic=True)  # periodic: keep_last=1 of the epoch_ and step_ files
        assert written() == ["epoch_002.pt"]
        checkpointer.save_if_best(0.5)
        checkpointer.save_if_best(0.4)  # not better: best.pt keeps the 0.5 checkpoint
        assert state.best_score == 0.5 and load_checkpoint(directory / "best.pt")["best_score"] == 0.5
        assert (directory / "latest.json").read_text().count("best.pt") == 1
        assert checkpointer.path_of(finished=True).name == "final.pt"
        assert checkpointer.path_of(finished=False).name == "step_00000008.pt"


def test_a_checkpoint_is_due_by_time_since_the_last_one(small_dataset, tmp_path):
    """checkpoint.every_minutes: due once that long passed since the last checkpoint of any kind; off at 0."""
    with open_trainer(
        small_dataset, tmp_path / "r", "checkpoint.every_minutes=0.5", "checkpoint.every_epochs=0"
    ) as trainer:
        checkpointer, state = trainer.checkpointer, trainer.state
        assert not checkpointer.due_by_time()
        checkpointer.last_saved -= 31  # half a minute and a second ago
        assert checkpointer.due_by_time()
        state.step = 7
        checkpointer.save("step_00000007.pt", periodic=True)
        assert not checkpointer.due_by_time()  # the clock restarts at every checkpoint
        checkpointer.cfg = type(checkpointer.cfg)(**{**checkpointer.cfg.__dict__, "every_minutes": 0.0})
        checkpointer.last_saved -= 10**6
        assert not checkpointer.due_by_time()


def test_resume_refuses_what_it_cannot_continue(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        trainer.state.step, trainer.state.epoch = 4, 1
        trainer.checkpointer.save("step_00000004.pt")
        record, identity = trainer.parts.record, trainer.checkpointer.identity
        order = trainer.sources.orders.settings
    resume = Resume("auto", run_dir=tmp_path / "r", epochs=2, seed=0)
    assert resume and resume.step == 4 and resume.path.name == "step_00000004.pt"
    assert resume.own_tracker() == {"wandb_run_id": None}
    assert resume.check(record, identity, order, ema_enabled=True) == ResumeOrder(None, [])  # its own run
    elsewhere = Resume(str(resume.path), run_dir=tmp_path / "other", epochs=2, seed=0)
    assert elsewhere.own_tracker() is None  # another run's checkpoint seeds weights, not the W&B run
    with pytest.raises(CheckpointError, match="with ema.enabled=False: the checkpoint was written with an EMA"):
        resume.check(record, identity, order, ema_enabled=False)
    with pytest.raises(CheckpointError, match="train.seed is 1, the stopped run's was 0"):
        resume.check(record, identity, dataclasses.replace(order, seed=1), ema_enabled=True)
    with pytest.raises(CheckpointError, match=r"data.path \(the dataset's manifest\) is 000000000000\.\.\."):
        resume.check(record, identity, dataclasses.replace(order, manifest="0" * 64), ema_enabled=True)
    done = Resume("auto", run_dir=tmp_path / "r", epochs=1, seed=0)
    assert done.completes_outputs  # its last epoch checkpointed, no summary.json yet: resuming writes the outputs
    done.check(record, identity, order, True)
    (tmp_path / "r" / "summary.json").write_text("{}")
    assert not done.completes_outputs
    with pytest.raises(RunFinished, match="already completed 1 of train.epochs=1 epochs"):
        done.check(record, identity, order, True)
    bigger = resume.check(record, dataclasses.replace(identity, global_batch=100), order, ema_enabled=True)
    assert bigger.notes == [
        "distvit: note: train.batch_size 50 -> 100 on resume: applies from step 4 (epoch 2); every sample is still "
        "seen once per epoch, and the lr schedule is re-planned in steps of the new batch."
    ]
    flips = dict(identity.augmentation, **{"augment.hflip": 0.0})
    assert resume.check(record, dataclasses.replace(identity, augmentation=flips), order, True).notes == [
        "distvit: note: augment.hflip 0.5 -> 0.0 on resume: applies from step 4 (epoch 2)."
    ]
    assert not Resume("auto", run_dir=tmp_path / "empty", epochs=2, seed=0)
    assert math.isinf(TrainState().best_score)


def test_a_run_cannot_end_before_what_it_trained(small_dataset, tmp_path):
    """train.epochs below the epochs a checkpoint completed (or equal, with part of the next one trained)
    is refused, naming the least it may be; equal to the completed epochs, the run ends there."""
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        trainer.state.step, trainer.state.epoch, trainer.state.samples_in_epoch = 6, 1, 100
        trainer.checkpointer.save("step_00000006.pt")
        record, identity = trainer.parts.record, trainer.checkpointer.identity
        order = trainer.sources.orders.settings
    for epochs, least in ((1, 2),):
        lowered = Resume("auto", run_dir=tmp_path / "r", epochs=epochs, seed=0)
        assert not lowered.completes_outputs
        with pytest.raises(
            CheckpointError,
            match=rf"train.epochs={epochs}: it already trained 1 epochs and part of epoch 2\. Resume with "
            rf"train.epochs of at least {least} \(its run planned 2\)",
        ):
            lowered.check(record, identity, order, True)


def test_a_changed_epoch_count_on_resume_is_announced_with_the_lr_before_and_after():
    """The issue's case: 98 steps per epoch, 2 epochs planned, resumed at the end with train.epochs=4 (cosine,
    no warmup): the lr was at its floor and jumps back to half the peak. The run's own schedule (planned
    once, in distvit.engine.optim) is re-planned over the checkpoint's epochs to compare."""
    from distvit.config import OptimConfig
    from distvit.engine.optim import Schedule

    resume = Resume("", run_dir=Path("run"), epochs=4, seed=0)
    resume.path, resume.payload = "run/checkpoints/final.pt", {"config": {"train": {"epochs": 2}}, "step": 196}
    schedule = Schedule(OptimConfig(lr=1e-3, min_lr=1e-7), steps_per_epoch=98, epochs=4)
    assert resume.schedule_change(schedule) == (
        "distvit: note: train.epochs is 4 on resume, 2 when run/checkpoints/final.pt was written: the lr schedule "
        "is re-planned over 4 epochs, so at step 196 the lr goes from 1e-07 (x0.0001 of the peak) to 0.0005 (x0.5000)."
    )
    assert resume.schedule_change(schedule.over(2)) is None  # the same plan: nothing to say


def test_a_checkpoint_written_before_the_keys_moved_resumes_without_a_change_to_announce(small_dataset, tmp_path):
    """Checkpoints of earlier versions record the augmentation under data.crop_padding, data.mixup_alpha,
    data.mix_prob... and the preset in their config as data.augment: read under the keys' new places."""
    from distvit.config import MOVED_KEYS

    with open_trainer(small_dataset, tmp_path / "r", "mix.cutmix_alpha=1.0") as trainer:
        trainer.state.step, trainer.state.epoch = 4, 1
        trainer.checkpointer.save("step_00000004.pt")
        record, identity = trainer.parts.record, trainer.checkpointer.identity
        order = trainer.sources.orders.settings
    path = tmp_path / "r" / "checkpoints" / "step_00000004.pt"
    payload = load_checkpoint(path)
    old_names = {new: old for old, new in MOVED_KEYS.items()}
    payload["data"]["augmentation"] = {old_names.get(k, k): v for k, v in payload["data"]["augmentation"].items()}
    assert (
        "data.cutmix_alpha" in payload["data"]["augmentation"]
        and "data.crop_padding" in payload["data"]["augmentation"]
    )
    config = payload["config"]
    config["data"].update(augment=config["augment"].pop("preset"), crop_padding=config["augment"].pop("crop_padding"))
    mix = config.pop("mix")
    config["data"].update(mixup_alpha=mix["mixup_alpha"], cutmix_alpha=mix["cutmix_alpha"])
    config["data"].update(mix_prob=mix["prob"], mix_switch_prob=mix["switch_prob"])
    config["train"].update(eval_batch_size=config.pop("eval")["batch_size"])
    save_checkpoint(path, payload)
    resume = Resume("auto", run_dir=tmp_path / "r", epochs=2, seed=0)
    assert resume.check(record, identity, order, ema_enabled=True) == ResumeOrder(None, [])
