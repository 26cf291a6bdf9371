"""What a training step is made of, built in one place: the model (with its record and input transform),
optimizer, schedule, EMA, teacher, and the module a step runs (compiled, DDP-wrapped, or the classifier
alone on cached features)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from distvit.augment import Augmenter, recipe_of
from distvit.config import Config
from distvit.data.transforms import BatchTransform
from distvit.engine.accelerator import compile_supported
from distvit.engine.ema import ModelEma, decay_for_run
from distvit.engine.features import cache_blockers
from distvit.engine.optim import build_optimizer, build_scheduler, lr_multiplier
from distvit.engine.sources import DataSources
from distvit.engine.teacher import Teacher, load_teacher
from distvit.errors import ConfigError
from distvit.model.build import set_fused_attention
from distvit.model.record import SurgeryRecord
from distvit.run.checkpoint import load_weights


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
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEma | None
    teacher: Teacher | None
    trained: torch.nn.Module
    """What a step runs: the compiled and/or DDP-wrapped model, or only its classifier on cached features."""
    lr_multiplier: float
    fused_attn: bool
    fused_fp16: bool
    """fp16 loss scaling with a fused optimizer (its skipped steps show only in the scale)."""
    compiled: bool = False
    compile_seconds: float = 0.0
    features_cached: bool = False


def build_parts(
    cfg: Config,
    model: torch.nn.Module,
    record: SurgeryRecord,
    sources: DataSources,
    accelerator: Accelerator,
    stored_size: tuple[int, int] | None,
    classes: list[str],
    resume_weights: dict[str, torch.Tensor] | None = None,
    resume_source: str = "",
) -> TrainParts:
    """Everything around `model` that a step needs, in the order that keeps ranks and resumes exact:
    device and optimizer first, then the checkpoint's weights, then what is derived from them (cached
    features, the EMA's copy, the compiled graph), and DDP last."""
    device = accelerator.device
    transform = BatchTransform((record.img_size, record.img_size), record.mean, record.std)
    fused_attn = set_fused_attention(model, cfg.model.fused_attn)
    teacher = load_teacher(cfg.distill, classes, device) if cfg.distill.type != "none" else None
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # training forward returns (class head, distillation head)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim, cfg.surgery.lr_decay, cfg.train.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, sources.steps_per_epoch, cfg.train.epochs)
    if resume_weights is not None:
        load_weights(model, resume_weights, record, source=resume_source)
    features_cached = _cache_features(cfg, model, sources, transform, accelerator)
    ema = None
    if cfg.ema.enabled:
        ema = ModelEma(model, decay_for_run(cfg.ema, sources.steps_per_epoch * cfg.train.epochs), cfg.ema.warmup)
    want_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
    compiled, compile_seconds = None, 0.0
    if want_compile and not features_cached:
        micro = cfg.train.batch_size // accelerator.num_processes // cfg.train.grad_accum_steps
        compiled, compile_seconds = compile_model(
            model, transform, stored_size or (record.img_size,) * 2, micro, accelerator
        )
    # On cached features only the classifier runs in a training step (and DDP syncs only its gradients).
    trained = model.get_classifier() if features_cached else model
    fused_fp16 = accelerator.scaler is not None and bool(optimizer.defaults.get("fused"))
    trained, optimizer = accelerator.prepare(trained if compiled is None else compiled, optimizer)
    return TrainParts(
        model=model,
        record=record,
        transform=transform,
        augment=Augmenter(recipe_of(cfg.data, cfg.augment), transform),
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        teacher=teacher,
        trained=trained,
        lr_multiplier=lr_multiplier(cfg.optim, cfg.train.batch_size),
        fused_attn=fused_attn,
        fused_fp16=fused_fp16,
        compiled=compiled is not None,
        compile_seconds=compile_seconds,
        features_cached=features_cached,
    )


def _cache_features(
    cfg: Config, model: torch.nn.Module, sources: DataSources, transform: BatchTransform, accelerator: Accelerator
) -> bool:
    """Train the head on the frozen backbone's features when train.cache_features allows and the run is
    head-only (see distvit.engine.features); returns whether it does."""
    if cfg.train.cache_features is False:
        return False
    blockers = cache_blockers(cfg, model)
    if blockers:
        if cfg.train.cache_features:
            raise ConfigError(
                f"train.cache_features=true needs a head-only run, but: {'; '.join(blockers)}. "
                f"Leave train.cache_features empty to use it only where possible."
            )
        return False
    sources.use_features(model, transform, cfg.train.eval_batch_size, accelerator)
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


def describe_parts(parts: TrainParts, cfg: Config, ddp_static_graph: bool) -> list[str]:
    """The optional features a run uses, for its start line."""
    features: list[tuple[str, Any]] = [
        (f"EMA decay {parts.ema.decay:.6f}" if parts.ema else "", parts.ema is not None),
        (f"distillation ({cfg.distill.type}) from {cfg.distill.teacher}", parts.teacher is not None),
        (f"{cfg.train.grad_accum_steps} micro-batches per step", cfg.train.grad_accum_steps > 1),
        (f"torch.compile ({parts.compile_seconds:.1f} s to compile)", parts.compiled),
        ("fused attention", parts.fused_attn),
        ("head trained on cached backbone features", parts.features_cached),
        ("DDP static graph", ddp_static_graph),
    ]
    return [name for name, on in features if on]
