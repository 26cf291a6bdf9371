"""`distvit evaluate`: exact accuracy of a checkpoint on a dataset split, on 1..N ranks, and its report."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator

from distvit.augment.transforms import BatchTransform
from distvit.data.manifest import read_manifest
from distvit.data.read.cache import ShardCache
from distvit.data.read.loader import loader_workers, open_batches
from distvit.engine.accelerator import cpu_processes, process_group_options
from distvit.engine.eval_counts import EvalResult, evaluate
from distvit.engine.sources import recorded_fetch_policy
from distvit.errors import ConfigError, DataError
from distvit.run.checkpoint_files import load_model, resolve_checkpoint


def evaluate_checkpoint(
    source: str, data_path: str | None, split: str | None, weights: str, global_batch: int, mode: str = "auto"
) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate a checkpoint (or a run directory's final one) on a dataset split, on every rank this
    process group has; returns the result and what was evaluated (for the report)."""
    path = resolve_checkpoint(source)
    model, record, payload = load_model(path, weights, require=("model", "surgery", "config", "classes", "step"))
    trained_on = payload["config"].get("data") or {}
    data_path = data_path or trained_on.get("path")
    split = split or trained_on.get("eval_split") or "test"  # by default what the run evaluated on
    manifest = read_manifest(data_path)
    split_info = manifest.split(split, data_path, key="--split")
    if list(manifest.classes) != list(payload["classes"]):
        raise DataError(
            f"dataset {data_path} has classes {list(manifest.classes)[:5]}..., the checkpoint was trained on "
            f"{list(payload['classes'])[:5]}...: evaluate on a dataset with the same classes in the same order."
        )
    accelerator = Accelerator(cpu=cpu_processes(), kwargs_handlers=[process_group_options()])
    if global_batch % accelerator.num_processes:
        raise ConfigError(
            f"--batch-size {global_batch} must be divisible by the number of processes ({accelerator.num_processes})."
        )
    model.to(accelerator.device)
    cache, workers = None, loader_workers(None)
    if trained_on.get("cache_dir") and data_path == trained_on.get("path"):  # the run streamed: so does this
        where = (trained_on["cache_dir"], trained_on["remote"], trained_on["cache_limit"])
        policy = recorded_fetch_policy(trained_on)
        cache = ShardCache(*where, split_info.shards, manifest.num_classes, policy)
        workers = loader_workers(trained_on.get("num_workers"))  # what the run's cache was sized for
    try:
        data = open_batches(
            data_path,
            manifest,
            split,
            mode=mode,
            num_workers=workers,
            device=accelerator.device,
            resize_to=record.img_size,
            cache=cache,
            decode="auto",
        )
        transform = BatchTransform((record.img_size, record.img_size), record.mean, record.std)
        result = evaluate(model, data, transform, global_batch, accelerator, record.num_classes)
    finally:
        if cache is not None:
            cache.close()
    about = {
        "checkpoint": str(path),
        "weights": weights,
        "data": str(data_path),
        "split": split,
        "num_samples_in_split": split_info.num_samples,
        "classes": list(payload["classes"]),
        "world_size": accelerator.num_processes,
        "step": payload["step"],
    }
    return result, about


def format_evaluation(result: EvalResult, about: dict[str, Any]) -> str:
    classes = about["classes"]
    lines = [
        f"{about['checkpoint']} ({about['weights']} weights, step {about['step']}) on {about['data']} "
        f"split '{about['split']}', {about['world_size']} process(es):",
        f"  top-1 {result.accuracy:.4f} ({result.correct}/{result.num_samples})  "
        f"top-5 {result.top5:.4f}  loss {result.loss:.4f}",
        "  per-class accuracy:",
    ]
    width = max(len(name) for name in classes)
    for name, accuracy, row in zip(classes, result.per_class_accuracy(), result.confusion):
        shown = f"{accuracy:.4f}" if accuracy is not None else "  n/a "
        lines.append(f"    {name:<{width}}  {shown}  ({sum(row)} images)")
    if len(classes) <= 20:
        lines.append("  confusion matrix (rows: true class, columns: predicted):")
        lines += [
            "    " + " ".join(f"{count:5d}" for count in row) + f"  {name}"
            for name, row in zip(classes, result.confusion)
        ]
    return "\n".join(lines)


def evaluation_json(result: EvalResult, about: dict[str, Any]) -> dict[str, Any]:
    return {
        **about,
        "accuracy": result.accuracy,
        "top5": result.top5,
        "loss": result.loss,
        "correct": result.correct,
        "num_samples": result.num_samples,
        "per_class_accuracy": result.per_class_accuracy(),
        "confusion": result.confusion,
    }
