"""What a run tells and leaves behind besides checkpoints: the start line, and at the end or at a stop the
summary (summary.json or stopped.json), the plots and (through the Checkpointer) the exported weights.
They describe the whole run from what its components report; no config section is read here."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distvit.engine.context import RunContext
from distvit.engine.metrics import MetricsMeter
from distvit.engine.parts import TrainParts, describe_parts
from distvit.engine.sources import DataSources
from distvit.engine.state import TrainState
from distvit.engine.step import TrainStep
from distvit.engine.stopping import FILE_REASON, PLANNED_STOP, StopRequests
from distvit.fileio import atomic_write_bytes
from distvit.run.rundir import STOPPED_NAME, write_summary


class RunOutputs:
    def __init__(self, *, context: RunContext, parts: TrainParts):
        self.context, self.parts = context, parts

    def effective_lr(self) -> float:
        return self.parts.effective_lr

    def start_line(self, sources: DataSources, ddp_static_graph: bool, resumed_from: Path | None, step: int) -> str:
        accelerator, record, parts = self.context.accelerator, self.parts.record, self.parts
        extras = describe_parts(parts, ddp_static_graph)
        subset = f" (subset of {sources.train_size})" if sources.subset is not None else ""
        augmentation = parts.augment.recipe.describe()
        return (
            f"distvit: {accelerator.num_processes} process(es) on {accelerator.distributed_type.value} "
            f"({accelerator.device.type}), mixed precision {accelerator.mixed_precision}; {record.model_name} at "
            f"{record.img_size}px/patch {record.patch_size} ({record.tokens_per_image} tokens, "
            f"{record.trainable_params:,} trainable params); {sources.num_train} train{subset} / "
            f"{len(sources.eval)} {self.context.eval_split} images, {sources.steps_per_epoch} steps/epoch of "
            f"{sources.batch_size}{sources.describe()}; augmentation: {augmentation}; "
            f"effective peak lr {self.effective_lr():.4g}{parts.lr_scaling}"
            + (f"; {', '.join(extras)}" if extras else "")
            + f"; run dir {self.context.run_dir}"
            + (f"; resumed from {resumed_from} at step {step}" if resumed_from else "")
        )

    def tracked_config(self) -> dict[str, Any]:
        """What W&B's config gets beside the resolved config."""
        ema = self.parts.ema
        return {
            "surgery": self.parts.record.to_dict(),
            "world_size": self.context.accelerator.num_processes,
            "effective_lr": self.effective_lr(),
            "ema_decay": ema.decay if ema else None,
        }

    def summary(
        self,
        *,
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
        accelerator, parts = self.context.accelerator, self.parts
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

    def write(
        self,
        summary: dict[str, Any],
        state: TrainState,
        stops: StopRequests,
        export: Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> None:
        """Main process, at the end or at a stop: export (`export`: the Checkpointer's, given the last
        evaluation; None when checkpoint.export is off), plots, summary.json (at the end, or at a stop by a STOP
        file with text: the run ends for good, the text its stop_reason) or stopped.json; a STOP file that
        stopped the run, or that came too late to stop a finished one, is consumed."""
        from distvit.run.plots import write_report  # matplotlib: only where plots are drawn

        run_dir, tracker = self.context.run_dir, self.context.tracker
        finished, stop_reason = summary["finished"], summary["stop_reason"]
        note = stops.note() if stop_reason == FILE_REASON else ""
        if note:  # a STOP file with text: the run ends here for good, summary.json says why
            summary["stop_reason"] = note
        exported = export(state.last_eval) if finished else None
        if exported is not None:
            summary["export"] = exported
        plots = write_report(run_dir)
        split = self.context.eval_split
        tracker.log_image_files({f"{split}/{p.stem}": p for p in plots if p.stem.startswith("confusion")}, state.step)
        if finished or note:
            write_summary(run_dir, summary)
        else:
            atomic_write_bytes(
                run_dir / STOPPED_NAME,
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
