"""What a training step is made of, built in one place: the model (with its record and input transform),
optimizer, schedule, EMA, teacher, and the module a step runs (compiled, DDP-wrapped, or the classifier
alone on cached features). Built from the sections of the parts it makes (optim, ema, distill, augment)
and the train section's compile, cache_features and batch settings."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from distvit.augment import Augmenter, recipe_of
from distvit.augment.transforms import BatchTransform
from distvit.config import AugmentConfig, DistillConfig, EmaConfig, OptimConfig, TrainConfig
from distvit.engine.accelerator import compile_supported
from distvit.engine.ema import ModelEma, build_ema
from distvit.engine.features import cache_blockers
from distvit.engine.optim import Schedule, build_optimizer, effective_lr
from distvit.engine.sources import DataSources
from distvit.engine.teacher import Teacher, load_teacher
from distvit.errors import ConfigError
from distvit.model.record import SurgeryRecord
from distvit.run.checkpoint_files import load_weights


@dataclass
class TrainParts:
    model: torch.nn.Module
    """The model itself: state dicts, EMA updates and evaluation use it (no DDP or compile wrapper)."""
    record: SurgeryRecord
    transform: BatchTransform
    augment: Augmenter
    """The training input: the augmentation recipe's parts around `transform`."""
    optimizer: torch.optim.Optimizer
    """Prepared by Accelerate (gradient scaling, DDP-aware zeroing)."""
    schedule: Schedule
    """The lr schedule as planned for this run (the scheduler follows it)."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEma | None
    teacher: Teacher | None
    trained: torch.nn.Module
    """What a step runs: the compiled and/or DDP-wrapped model, or only its classifier on cached features."""
    effective_lr: float
    """optim.lr scaled for the global batch (optim.lr_scale)."""
    lr_scaling: str
    """How it was scaled, for the start line ('' without scaling)."""
    fused_attn: bool
    fused_fp16: bool
    """fp16 loss scaling with a fused optimizer (its skipped steps show only in the scale)."""
    micro_batches: int = 1
    """train.grad_accum_steps: micro-batches per rank and step."""
    compiled: bool = False
    compile_seconds: float = 0.0
    features_cached: bool = False


def build_parts(
    model: torch.nn.Module,
    record: SurgeryRecord,
    *,
    transform: BatchTransform,
    sources: DataSources,
    accelerator: Accelerator,
    classes: list[str],
    train: TrainConfig,
    optim: OptimConfig,
    ema: EmaConfig,
    distill: DistillConfig,
    augment: AugmentConfig,
    mixing: bool,
    fused_attn: bool,
    feature_batch: int,
    stored_size: tuple[int, int] | None,
    weights: dict[str, torch.Tensor] | None = None,
    weights_source: str = "",
) -> TrainParts:
    """Everything around `model` that a step needs, in the order that keeps ranks and resumes exact:
    device and optimizer first, then the checkpoint's `weights` (a resume), then what is derived from
    them (cached features, the EMA's copy, the compiled graph), and DDP last. `mixing`: whether the step
    mixes (mix section); `feature_batch`: the global batch of the feature-caching pass (eval.batch_size)."""
    device = accelerator.device
    teacher = load_teacher(distill, classes, device)
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # training forward returns (class head, distillation head)
    model.to(device)
    optimizer = build_optimizer(model, optim, record.lr_decay, train.batch_size)
    schedule = Schedule(optim, sources.steps_per_epoch, train.epochs)
    scheduler = schedule.scheduler(optimizer)
    if weights is not None:
        load_weights(model, weights, record, source=weights_source)
    features_cached = _cache_features(
        wanted=train.cache_features,
        model=model,
        record=record,
        augment=augment,
        mixing=mixing,
        teacher=teacher,
        sources=sources,
        transform=transform,
        batch=feature_batch,
        accelerator=accelerator,
    )
    average = build_ema(model, ema, sources.steps_per_epoch * train.epochs)
    want_compile = train.compile if train.compile is not None else device.type == "cuda"
    compiled, compile_seconds = None, 0.0
    if want_compile and not features_cached:
        micro = train.batch_size // accelerator.num_processes // train.grad_accum_steps
        compiled, compile_seconds = compile_model(
            model, transform, stored_size or (record.img_size,) * 2, micro, accelerator
        )
    # On cached features only the classifier runs in a training step (and DDP syncs only its gradients).
    trained = model.get_classifier() if features_cached else model
    fused_fp16 = accelerator.scaler is not None and bool(optimizer.defaults.get("fused"))
    trained, optimizer = accelerator.prepare(trained if compiled is None else compiled, optimizer)
    lr, lr_scaling = effective_lr(optim, train.batch_size)
    return TrainParts(
        model=model,
        record=record,
        transform=transform,
        augment=Augmenter(recipe_of(augment), transform),
        optimizer=optimizer,
        schedule=schedule,
        scheduler=scheduler,
        ema=average,
        teacher=teacher,
        trained=trained,
        effective_lr=lr,
        lr_scaling=lr_scaling,
        fused_attn=fused_attn,
        fused_fp16=fused_fp16,
        micro_batches=train.grad_accum_steps,
        compiled=compiled is not None,
        compile_seconds=compile_seconds,
        features_cached=features_cached,
    )


def _cache_features(
    *,
    wanted: bool | None,
    model: torch.nn.Module,
    record: SurgeryRecord,
    augment: AugmentConfig,
    mixing: bool,
    teacher: Teacher | None,
    sources: DataSources,
    transform: BatchTransform,
    batch: int,
    accelerator: Accelerator,
) -> bool:
    """Train the head on the frozen backbone's features when train.cache_features (`wanted`) allows and the
    run is head-only (see distvit.engine.features); returns whether it does."""
    if wanted is False:
        return False
    blockers = cache_blockers(model, record, augment, mixing, teacher)
    if blockers:
        if wanted:
            raise ConfigError(
                f"train.cache_features=true needs a head-only run, but: {'; '.join(blockers)}. "
                f"Leave train.cache_features empty to use it only where possible."
            )
        return False
    sources.use_features(model, transform, batch, accelerator)
    return True


def compile_model(
    model: torch.nn.Module,
    transform: BatchTransform,
    stored_size: tuple[int, int],
    micro_batch: int,
    accelerator: Accelerator,
) -> tuple[torch.nn.Module | None, float]:
    """torch.compile the model and compile it now, with a forward and backward on a dummy micro-batch
    (before DDP wraps it and before the training RNG is seeded). All ranks agree: if compiling fails on
    any of them, every rank warns and trains eagerly, so no rank runs a step the others do not.
    Returns the compiled model (None: eager) and the seconds compiling took."""
    supported, reason = compile_supported()
    failure = "" if supported else reason
    compiled, seconds = None, 0.0
    if not failure:
        start = time.perf_counter()
        # a batch shaped and laid out (channels-last strides) like the transform's output: no recompile
        dummy = transform(torch.zeros(micro_batch, *stored_size, 3, dtype=torch.uint8, device=accelerator.device))
        try:
            compiled = torch.compile(model)
            with accelerator.autocast():
                output = compiled(dummy)
            sum(o.float().sum() for o in (output if isinstance(output, tuple) else (output,))).backward()
        except Exception as err:  # compiler failures come in many types
            failure = f"torch.compile failed ({type(err).__name__}: {str(err)[:300]})"
        model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    failures = [f for f in gather_object([failure]) if f]
    if failures:
        warnings.warn(f"train.compile=true: {failures[0]}; training without it on every rank.")
        return None, 0.0
    return compiled, seconds


def describe_parts(parts: TrainParts, ddp_static_graph: bool) -> list[str]:
    """The optional features a run uses, for its start line."""
    teacher = parts.teacher
    features: list[tuple[str, bool]] = [
        (f"EMA decay {parts.ema.decay:.6f}" if parts.ema else "", parts.ema is not None),
        (f"distillation ({teacher.kind}) from {teacher.source}" if teacher else "", teacher is not None),
        (f"{parts.micro_batches} micro-batches per step", parts.micro_batches > 1),
        (f"torch.compile ({parts.compile_seconds:.1f} s to compile)", parts.compiled),
        ("fused attention", parts.fused_attn),
        ("head trained on cached backbone features", parts.features_cached),
        ("DDP static graph", ddp_static_graph),
    ]
    return [name for name, on in features if on]
