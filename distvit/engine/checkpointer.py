"""The checkpoint schema, written and read in this one file: writing checkpoints (and the exported weights)
and the checkpoint a run resumes from.

A checkpoint (one `torch.save` file of plain containers, see distvit.run.checkpoint_files) holds:

    format_version, model, optimizer, scheduler, scaler, ema, ema_state {updates, decay}, epoch, step,
    data {epoch, samples_in_epoch, seed, manifest, split, global_batch, subset}, data_image_size,
    rng (every rank's torch RNG state), surgery (SurgeryRecord), classes, config, metrics (last
    evaluation), best_score, tracker {wandb_run_id}

`Checkpointer` writes it (`to_payload`; which one, and when, is decided in distvit.engine.after_step),
and the exported weights at the end; `Resume` finds, checks and restores it (`restore_payload`). All ranks
call both: saving gathers every rank's RNG state. This module reads the checkpoint section; Resume is given
train.resume, train.epochs and train.seed.

Not Accelerate's `save_state`: it keeps no epoch/step/sample position and only logs a failed RNG restore,
and exact mid-epoch resume on another world size needs both in the checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from distvit.config import CheckpointConfig
from distvit.engine.context import RunContext
from distvit.engine.optim import Schedule
from distvit.engine.order import (
    EpochOrders,
    OrderSettings,
    ResumeOrder,
    ResumePoint,
    augmentation_changes,
    compare,
    settings_of_checkpoint,
)
from distvit.engine.parts import TrainParts
from distvit.engine.seeds import rng_state
from distvit.engine.state import TrainState
from distvit.errors import CheckpointError, RunFinished
from distvit.model.export import export_model
from distvit.model.record import SurgeryRecord
from distvit.run import checkpoint_files as files
from distvit.run.checkpoint_files import BEST_NAME, CHECKPOINT_DIR, FINAL_NAME, step_name
from distvit.run.rundir import SUMMARY_NAME


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records about the data and settings a run's weights depend on (the epoch order's
    settings are the DataSources' own: see distvit.engine.order)."""

    global_batch: int
    classes: list[str]
    data_image_size: list[int] | None
    """The size images are stored at (checkpoints and exports keep it for `distvit predict`)."""
    augmentation: dict[str, Any]
    """How a sample is augmented (distvit.engine.order.augmentation_settings)."""
    config: dict[str, Any]
    """The resolved config, as a dict."""


def to_payload(
    *,
    parts: TrainParts,
    state: TrainState,
    identity: RunIdentity,
    order: OrderSettings,
    scaler: Any,
    rng: list[dict],
    wandb_run_id: str | None,
) -> dict[str, Any]:
    """`order`: the order settings of the epoch in progress (or, at an epoch's end, of the next one)."""
    ema = parts.ema
    counters = state.state_dict()
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.module.state_dict() if ema else None,
        "ema_state": {"updates": ema.updates, "decay": ema.decay} if ema else None,
        "epoch": counters["epoch"],
        "step": counters["step"],
        "data": {
            "epoch": counters["epoch"],
            "samples_in_epoch": counters["samples_in_epoch"],
            "seed": order.seed,
            "manifest": order.manifest,
            "split": order.split,
            "global_batch": identity.global_batch,
            "subset": order.subset,
            "order": order.to_dict(),
            "augmentation": dict(identity.augmentation),
        },
        "data_image_size": identity.data_image_size,
        "rng": rng,
        "surgery": parts.record.to_dict(),
        "classes": list(identity.classes),
        "config": identity.config,
        "metrics": counters["metrics"],
        "best_score": counters["best_score"],
        "tracker": {"wandb_run_id": wandb_run_id},
    }


def restore_payload(
    payload: dict[str, Any], parts: TrainParts, state: TrainState, accelerator: Accelerator, seed: int
) -> None:
    """Optimizer, schedule, loss scale, EMA, counters and this rank's RNG (the model's weights were loaded
    before anything was derived from them, see build_parts)."""
    try:
        parts.optimizer.load_state_dict(payload["optimizer"])
    except ValueError as err:  # parameter groups of another layout (an earlier distvit's layer-wise lr decay)
        raise CheckpointError(f"its optimizer state does not fit this run's parameter groups ({err}).") from None
    parts.scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(payload["scaler"])
    if parts.ema is not None:
        parts.ema.module.load_state_dict(payload["ema"])
        parts.ema.updates = int(payload["ema_state"]["updates"])
        parts.ema.decay = float(payload["ema_state"]["decay"])  # sized to the run as first planned
    state.load_state_dict(
        {
            "epoch": payload["epoch"],
            "step": payload["step"],
            "samples_in_epoch": payload["data"]["samples_in_epoch"],
            "metrics": payload["metrics"],
            "best_score": payload.get("best_score", -math.inf),
        }
    )
    rng, rank = payload["rng"], accelerator.process_index
    if len(rng) == accelerator.num_processes:
        torch.set_rng_state(rng[rank]["cpu"])
        if "cuda" in rng[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[rank]["cuda"])
    else:  # another world size: fresh, distinct streams (only drop-path draws from them)
        set_seed(seed + state.step * 1000 + rank)


class Checkpointer:
    """Writes checkpoints (rank 0, after gathering every rank's RNG), and the exported weights at the end."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        context: RunContext,
        parts: TrainParts,
        state: TrainState,
        identity: RunIdentity,
        orders: EpochOrders,
        steps_per_epoch: int,
    ):
        """`orders`: the epoch orders, whose settings each checkpoint records for the epoch in progress;
        `steps_per_epoch`: what an epoch_NNN.pt's step is, for pruning."""
        self.cfg, self.context = cfg, context
        self.orders = orders
        self.directory = context.run_dir / CHECKPOINT_DIR
        self.steps_per_epoch = steps_per_epoch
        self.parts, self.state, self.identity = parts, state, identity
        self.last_saved = time.monotonic()
        self.seconds = 0.0
        """Time spent writing checkpoints (every rank waits for rank 0's write; summary.json)."""

    def save(self, name: str, periodic: bool = False) -> None:
        """All ranks call this; rank 0 writes `name`, then marks it latest (and prunes periodic ones)."""
        start = time.perf_counter()
        accelerator = self.context.accelerator
        rng_states = gather_object([rng_state()])
        error = None
        if accelerator.is_main_process:
            order = self.orders.settings_of(self.state.epoch)
            run_id = self.context.tracker.run_id
            payload = to_payload(
                parts=self.parts,
                state=self.state,
                identity=self.identity,
                order=order,
                scaler=accelerator.scaler,
                rng=rng_states,
                wandb_run_id=run_id,
            )
            try:
                files.save_checkpoint(self.directory / name, payload)
                files.mark_latest(self.directory, name, self.state.step, self.state.epoch)
            except CheckpointError as err:  # a full disk, say: every rank stops with this message
                error = str(err)
            if periodic and error is None:
                files.prune_periodic(self.directory, self.cfg.keep_last, self._checkpoint_step)
        self.context.monitor.wait_for_main(error)  # not a training collective: a slow write is not a hung rank
        self.last_saved = time.monotonic()
        self.seconds += time.perf_counter() - start

    def save_final(self) -> None:
        self.save(FINAL_NAME)

    def due_by_time(self) -> bool:
        """This rank's clock says checkpoint.every_minutes passed since the last checkpoint (rank 0's
        answer is the one that counts: see StopRequests.agreed)."""
        minutes = self.cfg.every_minutes
        return bool(minutes) and time.monotonic() - self.last_saved >= minutes * 60

    def save_if_best(self, score: float) -> None:
        if self.cfg.keep_best and score > self.state.best_score:
            self.state.best_score = score
            self.save(BEST_NAME)

    def path_of(self, finished: bool) -> Path:
        """The checkpoint a finished or stopped run ends with."""
        return self.directory / (FINAL_NAME if finished else step_name(self.state.step))

    def export(self, last_eval: dict[str, Any]) -> dict[str, Any] | None:
        """Main process, at the end of a finished run (checkpoint.export; None when off): model.safetensors
        + model.json of the better of the raw and EMA weights at the last evaluation."""
        if not self.cfg.export:
            return None
        ema, identity = self.parts.ema, self.identity
        use_ema = ema is not None and last_eval.get("ema_accuracy", -1) >= last_eval.get("accuracy", 0)
        weights = (ema.module if use_ema else self.parts.model).state_dict()
        about = {"weights": "ema" if use_ema else "model"}
        paths = export_model(
            self.context.run_dir,
            weights,
            self.parts.record,
            {
                **about,
                "classes": list(identity.classes),
                "data_image_size": identity.data_image_size,
                "metrics": last_eval,
            },
        )
        return {**about, "files": [str(p) for p in paths]}

    def _checkpoint_step(self, name: str) -> int:
        """Optimizer step of a periodic checkpoint, from its name (epoch_NNN.pt or step_NNNNNNNN.pt)."""
        number = int(name.split("_")[1].split(".")[0])
        return number * self.steps_per_epoch if name.startswith("epoch_") else number


class Resume:
    """The checkpoint a run continues from."""

    def __init__(self, source: str, *, run_dir: Path, epochs: int, seed: int):
        """`source`: train.resume ('auto': the run directory's newest checkpoint; a file; '': none);
        `epochs`: train.epochs, the run's length now; `seed`: train.seed."""
        self.run_dir, self.epochs, self.seed = run_dir, epochs, seed
        if source == "auto":
            self.path = files.latest_checkpoint(run_dir)
        else:
            self.path = Path(source) if source else None
        self.payload = files.load_checkpoint(self.path, require=tuple(files.KEY_TYPES)) if self.path else None

    def __bool__(self) -> bool:
        return self.payload is not None

    @property
    def completes_outputs(self) -> bool:
        """This run's own final state, but the run ended before its outputs (export, summary.json) were all
        written (killed in between, say): resuming writes them and trains nothing."""
        payload = self.payload
        if not payload or payload["epoch"] != self.epochs or payload["data"]["samples_in_epoch"]:
            return False
        own = self.path.resolve().is_relative_to(self.run_dir.resolve())
        return own and not (self.run_dir / SUMMARY_NAME).is_file()

    def point(self, kept: OrderSettings | None) -> ResumePoint:
        """Where the run continues, and the order settings its epoch under way keeps."""
        return ResumePoint(self.payload["epoch"], self.payload["data"]["samples_in_epoch"], kept)

    @property
    def weights(self) -> dict[str, torch.Tensor] | None:
        """The model weights to start from (None: not resuming; they come from `path`)."""
        return self.payload["model"] if self.payload else None

    @property
    def step(self) -> int | None:
        return self.payload["step"] if self.payload else None

    def own_tracker(self) -> dict[str, Any] | None:
        """The W&B run a checkpoint of this run directory continues; another run's checkpoint seeds this
        run's weights, not its W&B run."""
        if not self.payload or not self.path.resolve().is_relative_to(self.run_dir.resolve()):
            return None
        return self.payload.get("tracker")

    def check(
        self, record: SurgeryRecord, identity: RunIdentity, order: OrderSettings, ema_enabled: bool
    ) -> ResumeOrder:
        """Refuse a checkpoint this run cannot continue exactly (before anything in the run dir changes);
        what the resumed epoch keeps of the stopped run's order, and notes on what changes and when."""
        payload, source = self.payload, str(self.path)
        self._check_epochs()
        saved = SurgeryRecord.from_dict(payload["surgery"])
        if saved.architecture() != record.architecture():
            raise CheckpointError(
                f"cannot resume from {source}: it was written for {saved.architecture()}, the config builds "
                f"{record.architecture()}. Resume with the run's own config (RUN_DIR/config.yaml)."
            )
        try:
            saved_order = settings_of_checkpoint(payload)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source} is damaged: its data section is unreadable ({err!r}).") from None
        epoch, samples = payload["epoch"], payload["data"]["samples_in_epoch"]
        plan = compare(saved_order, order, epoch, samples, source)
        where = f"step {payload['step']} (epoch {epoch + 1})"
        notes = list(plan.notes)
        if payload["data"].get("global_batch") not in (None, identity.global_batch):
            notes.append(
                f"distvit: note: train.batch_size {payload['data']['global_batch']} -> {identity.global_batch} on "
                f"resume: applies from {where}; every sample is still seen once per epoch, and the lr schedule is "
                "re-planned in steps of the new batch."
            )
        augmentation = augmentation_changes(payload["data"].get("augmentation"), identity.augmentation)
        if augmentation:
            notes.append(f"distvit: note: {augmentation} on resume: applies from {where}.")
        if (payload.get("ema") is not None) != ema_enabled:
            raise CheckpointError(
                f"cannot resume from {source} with ema.enabled={ema_enabled}: the checkpoint was written "
                f"{'with' if payload.get('ema') is not None else 'without'} an EMA. Resume with the run's own config."
            )
        return ResumeOrder(plan.kept, notes)

    def _check_epochs(self) -> None:
        """train.epochs against what the checkpoint trained: a finished run has nothing to resume; a run
        cannot end before what it already trained."""
        payload, source, epochs = self.payload, str(self.path), self.epochs
        done, partial = payload["epoch"], payload["data"]["samples_in_epoch"] > 0
        if done > epochs or (done == epochs and partial):
            trained = f"{done} epochs" + (f" and part of epoch {done + 1}" if partial else "")
            planned = payload.get("config", {}).get("train", {}).get("epochs")
            raise CheckpointError(
                f"cannot resume from {source} with train.epochs={epochs}: it already trained {trained}. Resume with "
                f"train.epochs of at least {done + 1 if partial else done}"
                + (f" (its run planned {planned})" if isinstance(planned, int) else "")
                + ", or evaluate the checkpoint as it is with `distvit evaluate`."
            )
        if done == epochs and not self.completes_outputs:
            raise RunFinished(
                f"{source} already completed {done} of train.epochs={epochs} epochs; "
                f"nothing to resume (the run directory is unchanged). Raise train.epochs to train longer."
            )

    def schedule_change(self, schedule: Schedule) -> str | None:
        """What a changed train.epochs does to the lr schedule at the resumed step (the cosine is planned
        over the whole run, so more epochs lift the lr back up), to announce it; None if unchanged.
        `schedule`: the run's, planned over its train.epochs."""
        before = self.payload["config"].get("train", {}).get("epochs")
        if not isinstance(before, int) or before == schedule.epochs:
            return None
        step, epochs = self.payload["step"], schedule.epochs
        old, new = schedule.over(before).factor(step), schedule.factor(step)
        return (
            f"distvit: note: train.epochs is {epochs} on resume, {before} when {self.path} was written: "
            f"the lr schedule is re-planned over {epochs} epochs, so at step {step} the lr goes from "
            f"{old * schedule.lr:.3g} (x{old:.4f} of the peak) to {new * schedule.lr:.3g} (x{new:.4f})."
        )

    def restore(self, parts: TrainParts, state: TrainState, accelerator: Accelerator) -> None:
        try:
            restore_payload(self.payload, parts, state, accelerator, self.seed)
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume from {self.path}: {err}") from None
