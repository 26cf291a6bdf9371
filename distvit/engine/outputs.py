"""What a run tells and leaves behind besides checkpoints: the start line, and at the end or at a stop the
summary (summary.json or stopped.json), the exported weights and the plots. The whole config is its
section: the start line and the summary describe all of the run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distvit.config import Config
from distvit.data.loader import MemoryBatches, StreamBatches
from distvit.engine.metrics import MetricsMeter
from distvit.engine.parts import TrainParts, describe_parts
from distvit.engine.sources import DataSources
from distvit.engine.state import TrainState
from distvit.engine.step import TrainStep
from distvit.engine.stopping import PLANNED_STOP, StopRequests
from distvit.fileio import atomic_write_bytes
from distvit.model.export import export_model
from distvit.run.rundir import STOPPED_NAME, write_summary
from distvit.run.tracking import RunTracker


def _reading(train: MemoryBatches | StreamBatches, decode: str) -> str:
    """How training batches are read, for the start line (data.mode=auto and data.decode=auto resolved)."""
    if isinstance(train, MemoryBatches):
        unused = " (data.decode=device applies to stream mode only)" if decode == "device" else ""
        return f"in memory{unused}"
    if train.samples.raw_jpeg:
        return "streamed from the shards, decoded on the device"
    workers = train.num_workers
    return "streamed from the shards, decoded " + (
        f"by {workers} loader worker(s)" if workers else "in the training process"
    )


class RunOutputs:
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        accelerator: Accelerator,
        parts: TrainParts,
        classes: list[str],
        data_image_size: list[int] | None,
    ):
        self.cfg, self.run_dir, self.accelerator, self.parts = cfg, run_dir, accelerator, parts
        self.classes, self.data_image_size = classes, data_image_size

    def effective_lr(self) -> float:
        return self.cfg.optim.lr * self.parts.lr_multiplier

    def start_line(self, sources: DataSources, ddp_static_graph: bool, resumed_from: Path | None, step: int) -> str:
        cfg, accelerator, record = self.cfg, self.accelerator, self.parts.record
        scaled = ""
        if cfg.optim.lr_scale != "none":
            scaled = f" (optim.lr {cfg.optim.lr:g} x {self.parts.lr_multiplier:.4g}, lr_scale={cfg.optim.lr_scale})"
        extras = describe_parts(self.parts, cfg, ddp_static_graph)
        subset = f" (subset of {sources.train_size})" if sources.subset is not None else ""
        order = f"; windows of {sources.shuffle_window} shards shuffled" if sources.shuffle_window else ""
        augmentation = self.parts.augment.recipe.describe()
        if sources.cache is not None:
            order += f"; streamed through {cfg.data.cache_dir} (at most {cfg.data.cache_limit / 1e9:.3g} GB)"
        order += f"; data {_reading(sources.train, cfg.data.decode)}"
        return (
            f"distvit: {accelerator.num_processes} process(es) on {accelerator.distributed_type.value} "
            f"({accelerator.device.type}), mixed precision {accelerator.mixed_precision}; {record.model_name} at "
            f"{record.img_size}px/patch {record.patch_size} ({record.tokens_per_image} tokens, "
            f"{record.trainable_params:,} trainable params); {sources.num_train} train{subset} / "
            f"{len(sources.eval)} {cfg.data.eval_split} images, {sources.steps_per_epoch} steps/epoch of "
            f"{cfg.train.batch_size}{order}; augmentation: {augmentation}; "
            f"effective peak lr {self.effective_lr():.4g}{scaled}"
            + (f"; {', '.join(extras)}" if extras else "")
            + f"; run dir {self.run_dir}"
            + (f"; resumed from {resumed_from} at step {step}" if resumed_from else "")
        )

    def tracked_config(self) -> dict[str, Any]:
        """What W&B's config gets beside the resolved config."""
        ema = self.parts.ema
        return {
            "surgery": self.parts.record.to_dict(),
            "world_size": self.accelerator.num_processes,
            "effective_lr": self.effective_lr(),
            "ema_decay": ema.decay if ema else None,
        }

    def summary(
        self,
        finished: bool,
        stop_reason: str | None,
        checkpoint: Path,
        state: TrainState,
        step: TrainStep,
        meter: MetricsMeter,
        feature_seconds: float | None,
        data_cache: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """`data_cache`: the shard cache's counts on this node (streaming through data.cache_dir)."""
        accelerator, parts = self.accelerator, self.parts
        return {
            "finished": finished,
            "stop_reason": stop_reason,
            "final": state.last_eval,
            "best_score": state.best_score if math.isfinite(state.best_score) else None,
            "checkpoint": str(checkpoint),
            "world_size": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision,
            "compute_dtype": step.compute_dtype,
            "steps": state.step,
            "epochs": state.epoch,
            "train_seconds": meter.train_seconds,
            "train_images_per_sec": meter.images_per_sec(),
            "compile_seconds": parts.compile_seconds or None,
            "feature_cache_seconds": feature_seconds if parts.features_cached else None,
            "effective_lr": self.effective_lr(),
            "ema_decay": parts.ema.decay if parts.ema else None,
            "surgery": parts.record.to_dict(),
            "data_cache": data_cache,
        }

    def write(self, summary: dict[str, Any], state: TrainState, tracker: RunTracker, stops: StopRequests) -> None:
        """Main process, at the end or at a stop: export, plots, summary.json or stopped.json; a STOP file
        that stopped the run, or that came too late to stop a finished one, is consumed."""
        from distvit.run.report import write_report  # matplotlib: only where plots are drawn

        finished, stop_reason = summary["finished"], summary["stop_reason"]
        if finished and self.cfg.checkpoint.export:
            summary["export"] = self._export(state.last_eval)
        plots = write_report(self.run_dir)
        split = self.cfg.data.eval_split
        tracker.log_image_files({f"{split}/{p.stem}": p for p in plots if p.stem.startswith("confusion")}, state.step)
        if finished:
            write_summary(self.run_dir, summary)
        else:
            atomic_write_bytes(
                self.run_dir / STOPPED_NAME,
                json.dumps(
                    {
                        "step": state.step,
                        "epoch": state.epoch,
                        "reason": stop_reason,
                        "checkpoint": summary["checkpoint"],
                    }
                ).encode(),
            )
        if finished or (stop_reason and stop_reason != PLANNED_STOP):
            # finished: a STOP that came after the last check was for this run, not for the next one here
            stops.consume_stop_file()

    def _export(self, last_eval: dict[str, Any]) -> dict[str, Any]:
        """model.safetensors + model.json of the better of the raw and EMA weights at the last evaluation."""
        ema = self.parts.ema
        use_ema = ema is not None and last_eval.get("ema_accuracy", -1) >= last_eval.get("accuracy", 0)
        weights = (ema.module if use_ema else self.parts.model).state_dict()
        about = {"weights": "ema" if use_ema else "model"}
        paths = export_model(
            self.run_dir,
            weights,
            self.parts.record,
            {**about, "classes": list(self.classes), "data_image_size": self.data_image_size, "metrics": last_eval},
        )
        return {**about, "files": [str(p) for p in paths]}
