"""The training engine: from a validated config to an evaluated, checkpointed model, on 1..N ranks.

`Trainer.__init__` assembles the run from its components; `run` trains the remaining epochs with
evaluation, checkpoints and stop requests; `train_epoch` is the loop. Each component is built with
keyword arguments from the config section it owns (the Trainer owns train and hands the others on
unread) and, if it acts during the run, the `RunContext`, passed once. Each decides itself when to act:

    DataSources   training and evaluation data, subset, each epoch's plan         sources.py (data)
    TrainParts    model, transform, optimizer, schedule, EMA, teacher, DDP      parts.py (optim.py, ema.py,
                                                                                  teacher.py: optim, ema, distill)
    TrainStep     one optimizer step: augmented and mixed inputs, loss, update    step.py (mixing.py: mix)
    TrainState    the counters a resume continues from                            state.py
    Resume        the checkpoint to continue from: found, checked, restored       checkpointer.py
    Checkpointer  the checkpoint schema, checkpoints and the exported weights     checkpointer.py (checkpoint)
    AfterStep     after each step: agree, stop, which checkpoint                  after_step.py
    Evaluator     when to evaluate, records, best score                           evaluator.py (eval)
    MetricsMeter  the logged training lines (SampleTrace: the sample trace)       metrics.py
    StopRequests  signals and the STOP file, agreed by all ranks                  stopping.py
    SampleFailures  a damaged sample one rank met, raised on every rank together  failures.py
    RunOutputs    start line, summary, plots                                      outputs.py
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import distvit
from distvit.augment.recipe import flip_warning
from distvit.augment.transforms import BatchTransform
from distvit.config import Config
from distvit.data.manifest import Manifest
from distvit.data.read.memory import SplitTensors
from distvit.data.read.shard_checks import preflight_marker
from distvit.engine import signals
from distvit.engine.accelerator import ddp_options, make_accelerator, size_cpu_threads, wait_for_everyone
from distvit.engine.after_step import AfterStep
from distvit.engine.checkpointer import Checkpointer, Resume, RunIdentity
from distvit.engine.context import RunContext
from distvit.engine.ema import uses_ema
from distvit.engine.eval_counts import EvalResult
from distvit.engine.evaluator import Evaluator, check_eval_batch
from distvit.engine.failures import SampleFailures
from distvit.engine.metrics import MetricsMeter
from distvit.engine.mixing import mixing_enabled
from distvit.engine.order import OrderSettings, ResumeOrder, augmentation_settings, order_settings
from distvit.engine.outputs import RunOutputs
from distvit.engine.parts import TrainParts, build_parts
from distvit.engine.peers import PeerMonitor, check_same_model_everywhere, is_peer_failure, main_only
from distvit.engine.sources import DataSources, agree_on_bad_shards
from distvit.engine.state import TrainState
from distvit.engine.step import TrainStep
from distvit.engine.stopping import StopRequests
from distvit.errors import PeerFailure
from distvit.model.build import build_model, configure_attention, nothing_frozen
from distvit.model.record import SurgeryRecord
from distvit.run.checkpoint_files import LATEST_NAME
from distvit.run.rundir import init_run_dir, lock_run_dir, run_folder
from distvit.run.tracking import RunTracker, log_with


@dataclass(frozen=True)
class _Start:
    """What the start-up checks established, for building the run."""

    manifest: Manifest
    """Bad shards left out, as all ranks agreed."""
    model: torch.nn.Module
    record: SurgeryRecord
    fused_attn: bool
    identity: RunIdentity
    order: OrderSettings
    resumed_order: ResumeOrder | None


class Trainer:
    # The run's components, by role (built in __init__, in this order).
    context: RunContext
    resume: Resume
    sources: DataSources
    evaluator: Evaluator
    parts: TrainParts
    step: TrainStep
    state: TrainState
    checkpointer: Checkpointer
    stops: StopRequests
    after_step: AfterStep
    meter: MetricsMeter
    outputs: RunOutputs

    def __init__(
        self,
        cfg: Config,
        manifest: Manifest,
        bad_shards: dict[str, str] | None = None,
        splits: dict[str, SplitTensors] | None = None,
    ):
        """`splits`: in-memory data by split name instead of the shards of cfg.data.path (benchmarks)."""
        self.cfg = cfg
        self.run_dir = run_folder(cfg.run)
        # 1. Processes first: every later step may use collectives, and a lost peer must be nameable.
        self.accelerator = make_accelerator(
            cfg.train, log_with=log_with(cfg.tracking), nothing_frozen=nothing_frozen(cfg.surgery)
        )
        check_eval_batch(cfg.eval, self.accelerator.num_processes)
        self.monitor = PeerMonitor(self.accelerator.num_processes, cfg.train.timeout_s)
        self.threads = size_cpu_threads(cfg.train, self.accelerator.device)
        # 2. One dataset on every rank (bad shards agreed), one model on every rank (fingerprints compared),
        #    and a resume checked against both: all before anything in the run directory changes.
        start = self._check_before_the_run_dir(
            agree_on_bad_shards(cfg.data, manifest, bad_shards or {}, self.accelerator)
        )
        # 3. Rank 0 prepares the run directory once every rank has passed (NCCL's init has no barrier).
        self._prepare_run_dir()
        # 4. Data, the context the run's components share, then everything a step needs (the checkpoint's
        #    weights load before anything derives from them).
        self._build_data_and_step(start, splits)
        # 5. Counters and RNG: restored, or from here each rank's own random stream (drop-path).
        self.state = TrainState()
        if self.resume:
            self.resume.restore(self.parts, self.state, self.accelerator)
            replanned = self.resume.schedule_change(self.parts.schedule)
            for note in [*start.resumed_order.notes, *([replanned] if replanned else [])]:
                self.accelerator.print(note)
        else:
            set_seed(cfg.train.seed + self.accelerator.process_index)
        # 6. The components that act during the run, then the start line.
        self._add_run_components(start.identity)

    def _check_before_the_run_dir(self, manifest: Manifest) -> _Start:
        """The model (the same on every rank), what checkpoints record of the run, its epoch order, and the
        checkpoint it resumes from checked against them."""
        cfg, train = self.cfg, self.cfg.train
        self.classes, self.flip_safe = list(manifest.classes), manifest.flip_safe
        self.resume = Resume(train.resume, run_dir=self.run_dir, epochs=train.epochs, seed=train.seed)
        signals.expect_first_step((self.resume.step or 0) + 1)  # named by a stop during start-up
        set_seed(train.seed)  # same initial weights on every rank
        model, record = build_model(cfg.model, cfg.surgery, manifest.num_classes)
        check_same_model_everywhere(record)
        identity = RunIdentity(
            global_batch=train.batch_size,
            classes=self.classes,
            data_image_size=list(manifest.image_size) if manifest.image_size else None,
            augmentation=augmentation_settings(cfg.augment, cfg.mix),
            config=cfg.to_dict(),
        )
        order = order_settings(cfg.data, manifest, seed=train.seed, augment=cfg.augment)
        resumed_order = None
        if self.resume:
            resumed_order = self.resume.check(record, identity, order, ema_enabled=uses_ema(cfg.ema))
        fused_attn = configure_attention(model, cfg.model)
        return _Start(manifest, model, record, fused_attn, identity, order, resumed_order)

    def _prepare_run_dir(self) -> None:
        cfg, run_dir, accelerator = self.cfg, self.run_dir, self.accelerator
        wait_for_everyone(accelerator)
        if accelerator.is_local_main_process:
            preflight_marker().unlink(missing_ok=True)  # the node's ranks are past their preflight wait

        def prepare() -> None:
            with signals.deferred():  # a stop request during start-up leaves the run directory whole
                lock_run_dir(run_dir)  # a second run in this folder stops here, before anything changes
                resumed_step, yaml = self.resume.step, cfg.to_yaml()
                init_run_dir(run_dir, cfg.run, resume=cfg.train.resume, config_yaml=yaml, resumed_step=resumed_step)

        self.monitor.wait_for_main(main_only(accelerator, prepare, f"preparing {run_dir}"))

    def _build_data_and_step(self, start: _Start, splits: dict[str, SplitTensors] | None) -> None:
        """The data sources, the run's context and evaluator, the parts of a step and the step."""
        cfg, train, accelerator, record = self.cfg, self.cfg.train, self.accelerator, start.record
        kept = start.resumed_order
        self.sources = DataSources(
            cfg.data,
            manifest=start.manifest,
            accelerator=accelerator,
            img_size=record.img_size,
            order=start.order,
            global_batch=train.batch_size,
            splits=splits,
            resumed=self.resume.point(kept.kept) if kept is not None else None,
        )
        self.tracker = RunTracker(cfg.tracking, accelerator=accelerator, run_dir=self.run_dir, class_names=self.classes)
        self.context = context = RunContext(
            accelerator=accelerator,
            run_dir=self.run_dir,
            monitor=self.monitor,
            tracker=self.tracker,
            classes=self.classes,
            eval_split=self.sources.eval_split,
        )
        transform = BatchTransform((record.img_size, record.img_size), record.mean, record.std)
        self.evaluator = Evaluator(
            cfg.eval, context=context, data=self.sources.eval, transform=transform, epochs=train.epochs
        )
        self.sources.check_cache(train.epochs, self.evaluator.batch_size)
        self.parts = build_parts(
            start.model,
            record,
            transform=transform,
            sources=self.sources,
            accelerator=accelerator,
            classes=self.classes,
            train=train,
            optim=cfg.optim,
            ema=cfg.ema,
            distill=cfg.distill,
            augment=cfg.augment,
            mixing=mixing_enabled(cfg.mix),
            fused_attn=start.fused_attn,
            feature_batch=self.evaluator.batch_size,
            stored_size=start.manifest.image_size,
            weights=self.resume.weights,
            weights_source=str(self.resume.path),
        )
        self.step = TrainStep(self.parts, train=train, optim=cfg.optim, mix=cfg.mix, accelerator=accelerator)

    def _add_run_components(self, identity: RunIdentity) -> None:
        """Checkpoints, stop requests and the decision after each step, metrics, outputs; the start line."""
        cfg, context, parts, sources = self.cfg, self.context, self.parts, self.sources
        accelerator = context.accelerator
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            context=context,
            parts=parts,
            state=self.state,
            identity=identity,
            orders=sources.orders,
            steps_per_epoch=sources.steps_per_epoch,
        )
        self.failures = SampleFailures(accelerator)
        self.stops = StopRequests(self.run_dir, accelerator, self.failures)
        self.after_step = AfterStep(
            cfg.checkpoint, stop_at_step=cfg.train.stop_at_step, stops=self.stops, clock=self.checkpointer.due_by_time
        )
        self.stop_reason: str | None = None
        self.meter = MetricsMeter(cfg.train.log_every, accelerator=accelerator, tracker=context.tracker)
        self.trace = sources.trace(self.run_dir)
        self.outputs = RunOutputs(context=context, parts=parts)
        ddp = ddp_options(nothing_frozen(cfg.surgery), parts.micro_batches)
        static_graph = accelerator.num_processes > 1 and ddp["static_graph"]
        start = self.outputs.start_line(sources, static_graph, self.resume.path, self.state.step)
        accelerator.print(start + self.threads)
        warning = flip_warning(parts.augment.recipe, self.flip_safe, sources.path)
        if warning:
            accelerator.print(f"distvit: {warning}")

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs with evaluation and checkpoints; returns the summary."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        self.tracker.start({**cfg.to_dict(), **self.outputs.tracked_config()}, self.resume.own_tracker())
        self.monitor.wait_for_main()  # W&B starts on rank 0 only
        start_up = time.monotonic() - distvit.STARTED
        epochs = cfg.train.epochs
        finished = state.epoch >= epochs  # a finished run missing its outputs: write them only
        try:
            if finished and not self.checkpointer.path_of(True).is_file():
                self._end_early()
            while state.epoch < epochs and self.train_epoch():
                if self.evaluator.due(state.epoch):
                    self.checkpointer.save_if_best(self.evaluator.run(self._models(), state))
                if state.epoch == epochs:  # the run's end: its final checkpoint, no decision to take
                    self.checkpointer.save_final()
                    finished = True
                elif self._after_step(at_epoch_end=True):
                    break
            summary = self.outputs.summary(
                finished=finished,
                stop_reason=self.stop_reason,
                checkpoint=self.checkpointer.path_of(finished),
                state=state,
                step=self.step,
                meter=self.meter,
                feature_seconds=self.sources.feature_seconds,
                data_cache=self.sources.cache_stats(),
            )
            summary["seconds"] = {  # where the time went: the fixed costs beside the training steps
                "start_up": start_up,
                "training_steps": self.meter.train_seconds,
                "evaluation": self.evaluator.seconds,
                "checkpoints": self.checkpointer.seconds,
                "total_before_outputs": time.monotonic() - distvit.STARTED,
            }
            write = lambda: self.outputs.write(summary, state, self.stops, self.checkpointer.export)  # noqa: E731
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
        steps = self.sources.epoch_inputs(state.epoch, plan, local, self.failures.handler)
        for data in self.meter.timed(steps):
            lr = self.step.peak_lr()  # what this step uses (logged)
            self.meter.add(self.step(data), data.batch.global_valid)
            state.step += 1
            state.samples_in_epoch += data.batch.global_valid
            self.trace.write(state.epoch + 1, state.step, data.batch)
            progress.update(1)
            last_of_epoch = data.batch.step == len(plan) - 1
            mean_loss = self.meter.log_if_due(state, lr, last_of_epoch, self.step.log_values())
            if mean_loss is not None:
                progress.set_postfix(loss=f"{mean_loss:.3f}")
            if last_of_epoch:  # run() evaluates, then checkpoints or stops as due
                self.failures.check()  # nothing of a rank's damaged sample reaches the evaluation
                state.finish_epoch()
            elif self._after_step(at_epoch_end=False):
                progress.close()
                return False
        progress.close()
        return True

    def _after_step(self, at_epoch_end: bool) -> bool:
        """Do what the decision after this step (or epoch) says (distvit.engine.after_step): write its
        checkpoint, if any; returns whether the run stops. A damaged sample on any rank raises in the
        decision, before anything is saved."""
        action = self.after_step(self.state, at_epoch_end)
        if action.checkpoint:
            self.checkpointer.save(action.checkpoint, periodic=action.periodic)
        self.stop_reason = action.stop
        return action.stop is not None

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

    def _models(self) -> dict[str, Any]:
        models = {"model": self.parts.model}
        if self.parts.ema is not None:
            models["ema"] = self.parts.ema.module
        return models


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
