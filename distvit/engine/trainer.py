"""The training engine: from a validated config to an evaluated, checkpointed model, on 1..N ranks.

`Trainer.__init__` assembles the run from its components; `run` trains the remaining epochs with
evaluation, checkpoints and stop requests; `train_epoch` is the loop. Each component owns its config
section and decides itself when to act:

    DataSources   the training and evaluation data, the subset and each epoch's plan   (sources.py)
    TrainParts    model, record, transform, optimizer, schedule, EMA, teacher, DDP      (parts.py)
    TrainStep     one optimizer step: inputs, loss, forward/backward, optimizer          (step.py)
    TrainState    the counters a resume continues from                                   (state.py)
    Resume        the checkpoint to continue from: found, checked, restored              (checkpointer.py)
    Checkpointer  the checkpoint schema and when checkpoints are due                     (checkpointer.py)
    Evaluator     when to evaluate, exact counts, confusion file, best score            (evaluator.py)
    MetricsMeter  the logged training lines; SampleTrace the per-rank sample trace       (metrics.py)
    StopRequests  signals, STOP file, stop_at_step, timed checkpoints, agreed by all    (stopping.py)
    SampleFailures  a damaged sample one rank met, raised on every rank together         (failures.py)
    RunOutputs    start line, summary, export and plots                                  (outputs.py)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from tqdm.auto import tqdm

import distvit
from distvit.augment.recipe import flip_warning
from distvit.config import Config
from distvit.data.manifest import Manifest
from distvit.data.memory import SplitTensors
from distvit.data.preflight import preflight_marker
from distvit.engine import signals
from distvit.engine.accelerator import ddp_options, make_accelerator, size_cpu_threads, wait_for_everyone
from distvit.engine.checkpointer import Checkpointer, Resume, RunIdentity
from distvit.engine.evaluation import EvalResult
from distvit.engine.evaluator import Evaluator
from distvit.engine.failures import SampleFailures
from distvit.engine.metrics import MetricsMeter, SampleTrace
from distvit.engine.order import order_settings
from distvit.engine.outputs import RunOutputs
from distvit.engine.parts import build_parts
from distvit.engine.peers import PeerMonitor, check_same_model_everywhere, is_peer_failure
from distvit.engine.sources import DataSources, agree_on_bad_shards
from distvit.engine.state import TrainState
from distvit.engine.step import TrainStep
from distvit.engine.stopping import StopRequests
from distvit.errors import DistvitError, PeerFailure
from distvit.model.build import build_model
from distvit.run.checkpoint import LATEST_NAME
from distvit.run.rundir import init_run_dir, lock_run_dir
from distvit.run.tracking import RunTracker


class Trainer:
    def __init__(
        self,
        cfg: Config,
        manifest: Manifest,
        bad_shards: dict[str, str] | None = None,
        splits: dict[str, SplitTensors] | None = None,
    ):
        """`splits`: in-memory data by split name instead of the shards of cfg.data.path (benchmarks)."""
        self.cfg = cfg
        self.run_dir = run_dir = Path(cfg.run.dir)
        # 1. Processes first: every later step may use collectives, and a lost peer must be nameable.
        self.accelerator = accelerator = make_accelerator(cfg)
        self.monitor = PeerMonitor(accelerator.num_processes, cfg.train.timeout_s)
        self.threads = size_cpu_threads(cfg, accelerator.device)
        # 2. One dataset on every rank (bad shards agreed), one model on every rank (fingerprints compared),
        #    and a resume checked against both: all before anything in the run directory changes.
        manifest = agree_on_bad_shards(cfg.data, manifest, bad_shards or {}, accelerator)
        self.classes = list(manifest.classes)
        self.flip_safe = manifest.flip_safe
        self.resume = Resume(cfg.train, run_dir)
        signals.expect_first_step((self.resume.step or 0) + 1)  # named by a stop during start-up
        set_seed(cfg.train.seed)  # same initial weights on every rank
        model, record = build_model(cfg.model, cfg.surgery, manifest.num_classes)
        check_same_model_everywhere(record)
        identity = RunIdentity.of(cfg, manifest)
        order = order_settings(cfg, manifest)
        resumed_order = self.resume.check(record, identity, order, cfg.ema.enabled) if self.resume else None
        # 3. Rank 0 prepares the run directory once every rank has passed (NCCL's init has no barrier).
        wait_for_everyone(accelerator)
        if accelerator.is_local_main_process:
            preflight_marker().unlink(missing_ok=True)  # the node's ranks are past their preflight wait

        def prepare_run_dir() -> None:
            with signals.deferred():  # a stop request during start-up leaves the run directory whole
                lock_run_dir(run_dir)  # a second run in this folder stops here, before anything changes
                init_run_dir(run_dir, cfg, self.resume.step)

        self.monitor.wait_for_main(main_only(accelerator, prepare_run_dir, f"preparing {run_dir}"))
        # 4. Data, then everything a step needs (the checkpoint's weights load before anything derives from them).
        resumed = self.resume.point(resumed_order.kept) if resumed_order is not None else None
        self.sources = DataSources(cfg.data, cfg.train, manifest, accelerator, record.img_size, order, splits, resumed)
        self.parts = parts = build_parts(
            cfg, model, record, self.sources, accelerator, manifest.image_size, self.classes, *self.resume.weights()
        )
        self.step = TrainStep(parts, cfg.train, cfg.data, cfg.optim, cfg.distill, accelerator)
        # 5. Counters and RNG: restored, or from here each rank's own random stream (drop-path).
        self.state = TrainState()
        if self.resume:
            self.resume.restore(parts, self.state, accelerator)
            replanned = self.resume.schedule_change(cfg.optim, self.sources.steps_per_epoch)
            for note in [*resumed_order.notes, *([replanned] if replanned else [])]:
                accelerator.print(note)
        else:
            set_seed(cfg.train.seed + accelerator.process_index)
        # 6. The components that act during the run, then the start line.
        self._add_run_components(identity)

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs with evaluation and checkpoints; returns the summary."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        self.tracker.start(cfg, self.outputs.tracked_config(), self.resume.own_tracker())
        self.monitor.wait_for_main()  # W&B starts on rank 0 only
        start_up = time.monotonic() - distvit.STARTED
        finished = state.epoch >= cfg.train.epochs  # a finished run missing its outputs: write them only
        try:
            if finished and not self.checkpointer.path_of(True).is_file():
                self._end_early()
            while state.epoch < cfg.train.epochs and self.train_epoch():
                if self.evaluator.due(state.epoch):
                    self.checkpointer.save_if_best(self.evaluator.run(self._models(), state))
                if state.epoch == cfg.train.epochs:
                    self.checkpointer.save_final()
                    finished = True
                elif self._stop_or_checkpoint(at_epoch_end=True):
                    break
            summary = self.outputs.summary(
                finished,
                self.stop_reason,
                self.checkpointer.path_of(finished),
                state,
                self.step,
                self.meter,
                self.sources.feature_seconds,
                self.sources.cache_stats(),
            )
            summary["seconds"] = {  # where the time went: the fixed costs beside the training steps
                "start_up": start_up,
                "training_steps": self.meter.train_seconds,
                "evaluation": self.evaluator.seconds,
                "checkpoints": self.checkpointer.seconds,
                "total_before_outputs": time.monotonic() - distvit.STARTED,
            }
            write = lambda: self.outputs.write(summary, state, self.tracker, self.stops)  # noqa: E731
            self.monitor.wait_for_main(main_only(accelerator, write, f"writing the run's outputs in {self.run_dir}"))
        finally:
            self.sources.close()
            self.stops.close()
            self.tracker.finish()
            self.trace.close()
        if not finished:
            accelerator.print(
                f"distvit: stopped after step {state.step} ({self.stop_reason}); checkpoint "
                f"{self.checkpointer.path_of(False)}. Continue with train.resume=auto."
            )
        self.monitor.wait_for_main()  # rank 0 may still be uploading W&B files (tracker.finish)
        accelerator.end_training()
        return summary

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when it stopped mid-epoch (planned or requested)."""
        state = self.state
        if not self.step.compute_dtype:
            self.step.watch_compute_dtype()
        plan, local = self.sources.epoch_plan(state.epoch, state.samples_in_epoch)
        self.parts.trained.train()
        self.meter.start_epoch()
        progress = tqdm(
            total=len(plan),
            desc=f"epoch {state.epoch + 1}/{self.cfg.train.epochs}",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
            leave=False,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        for batch, images, labels in self.meter.timed(self.sources.train.epoch(plan, self.failures.handler)):
            lr = self.step.peak_lr()  # what this step uses (logged)
            self.meter.add(self.step(batch, images, labels, local, plan.global_batch, state.epoch), batch.global_valid)
            state.step += 1
            state.samples_in_epoch += batch.global_valid
            self.trace.write(state.epoch + 1, state.step, batch)
            progress.update(1)
            last_of_epoch = batch.step == len(plan) - 1
            mean_loss = self.meter.log_if_due(state, lr, last_of_epoch, self.step.log_values())
            if mean_loss is not None:
                progress.set_postfix(loss=f"{mean_loss:.3f}")
            if last_of_epoch:  # run() evaluates, then checkpoints or stops as due
                self.failures.check()  # nothing of a rank's damaged sample reaches the evaluation
                state.finish_epoch()
            elif self._stop_or_checkpoint(at_epoch_end=False):
                progress.close()
                return False
        progress.close()
        return True

    def _end_early(self) -> None:
        """train.epochs lowered to the epochs a stopped run had completed: the run ends here, evaluated
        (unless its last evaluation was of this epoch) and with its final checkpoint."""
        state = self.state
        if state.last_eval.get("epoch") != state.epoch or state.last_eval.get("step") != state.step:
            self.checkpointer.save_if_best(self.evaluator.run(self._models(), state))
        self.checkpointer.save_final()

    def evaluate(self) -> dict[str, EvalResult]:
        """Exact results of the model (and the EMA) on the evaluation split."""
        return self.evaluator.evaluate(self._models())

    def _add_run_components(self, identity: RunIdentity) -> None:
        """Tracking, checkpoints, evaluation, metrics, stop requests and outputs, and the start line."""
        cfg, run_dir, accelerator, parts = self.cfg, self.run_dir, self.accelerator, self.parts
        self.tracker = RunTracker(accelerator, cfg, run_dir, self.classes)
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            run_dir,
            accelerator,
            self.monitor,
            self.sources.steps_per_epoch,
            parts,
            self.state,
            identity,
            self.tracker,
            orders=self.sources.orders,
        )
        self.evaluator = Evaluator(
            cfg.train,
            cfg.data.eval_split,
            self.sources.eval,
            parts.transform,
            self.classes,
            accelerator,
            self.tracker,
            run_dir,
        )
        self.meter = MetricsMeter(cfg.train.log_every, accelerator, self.tracker)
        self.trace = SampleTrace(run_dir, accelerator.process_index, cfg.data.trace_samples)
        self.failures = SampleFailures(accelerator)
        self.stops = StopRequests(
            run_dir, accelerator, cfg.checkpoint.stop_check_every, cfg.train.stop_at_step, self.failures
        )
        self.stop_reason: str | None = None
        self.outputs = RunOutputs(cfg, run_dir, accelerator, parts, self.classes, identity.data_image_size)
        static_graph = accelerator.num_processes > 1 and ddp_options(cfg)["static_graph"]
        start = self.outputs.start_line(self.sources, static_graph, self.resume.path, self.state.step)
        accelerator.print(start + self.threads)
        warning = flip_warning(parts.augment.recipe, self.flip_safe, cfg.data.path)
        if warning:
            accelerator.print(f"distvit: {warning}")

    def _models(self) -> dict[str, Any]:
        models = {"model": self.parts.model}
        if self.parts.ema is not None:
            models["ema"] = self.parts.ema.module
        return models

    def _stop_or_checkpoint(self, at_epoch_end: bool) -> bool:
        """After a step (or an epoch): stop with a checkpoint if asked to, else write a periodic checkpoint
        if one is due. Returns whether the run stops. A damaged sample on any rank raises here, before
        anything is saved."""
        checkpointer = self.checkpointer
        agreement = self.stops.reason(
            self.state.step,
            at_epoch_end,
            checkpoint_due=checkpointer.due_by_count(at_epoch_end) is not None,
            checkpoint_time=checkpointer.due_by_time(),
        )
        self.stop_reason = agreement.stop
        if self.stop_reason:
            checkpointer.save_stopped()
            return True
        checkpointer.save_if_due(at_epoch_end, by_time=agreement.checkpoint_time)
        return False


def run_training(cfg: Config, manifest: Manifest, bad_shards: dict[str, str] | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint as configured; returns the run summary (also in summary.json).
    A collective that fails or times out (another rank died or hangs) becomes a `PeerFailure` naming
    the unresponsive ranks, within train.timeout_s."""
    trainer = Trainer(cfg, manifest, bad_shards)
    try:
        return trainer.run()
    except Exception as err:
        if trainer.accelerator.num_processes == 1 or not is_peer_failure(err):
            raise
        who = trainer.monitor.unresponsive()
        latest = trainer.checkpointer.directory / LATEST_NAME
        raise PeerFailure(
            f"rank {trainer.accelerator.process_index}: lost contact with the other ranks at step {trainer.state.step} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). {who}. Another rank died or hangs "
            f"(train.timeout_s={cfg.train.timeout_s}); restart with train.resume=auto to continue from "
            f"{'the checkpoint in ' + str(latest) if latest.exists() else 'the start (no checkpoint yet)'}."
        ) from None


def main_only(accelerator, work, what: str) -> str | None:
    """Run rank 0's own work; the error it ends with (a full disk, an unwritable folder), for every rank
    to stop with (PeerMonitor.wait_for_main), instead of rank 0 leaving alone and the others waiting."""
    if not accelerator.is_main_process:
        return None
    try:
        work()
    except (OSError, DistvitError) as err:
        if isinstance(err, DistvitError):
            return str(err)
        reason = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        return (
            f"{what} failed ({reason}). Fix the cause (free space, permissions) and run again with train.resume=auto."
        )
    return None
