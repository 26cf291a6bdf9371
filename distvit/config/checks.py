"""Rules that involve several config keys or the file system (weights, checkpoints, the dataset folder).
They run after the values are validated, before any process group exists."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from distvit.config.schema import Config
from distvit.data.manifest import MANIFEST_NAME
from distvit.errors import ConfigError


def check_semantics(cfg: Config, source: str, check_data: bool = True) -> None:
    """Rules that involve several keys or the file system."""
    s = cfg.surgery
    if s.img_size is not None and s.patch_size is not None and s.img_size % s.patch_size:
        raise ConfigError(
            f"{source}: surgery.img_size={s.img_size} is not divisible by surgery.patch_size={s.patch_size}. "
            f"Choose an img_size that is a multiple of the patch size (e.g. "
            f"{max(s.patch_size, s.img_size // s.patch_size * s.patch_size)}) or another patch_size."
        )
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"{source}: optim.min_lr={cfg.optim.min_lr} is larger than optim.lr={cfg.optim.lr}; "
            f"min_lr must be between 0 and lr."
        )
    if isinstance(cfg.model.pretrained, str):
        weights = Path(cfg.model.pretrained)
        if not weights.is_file():
            raise ConfigError(
                f"{source}: model.pretrained={cfg.model.pretrained!r} is neither true/false nor an existing "
                f"weights file. Pass true (download from the hub), false (random init) or the path of a "
                f".pth/.safetensors file."
            )
    if cfg.train.resume not in ("", "auto") and not Path(cfg.train.resume).is_file():
        raise ConfigError(
            f"{source}: train.resume={cfg.train.resume!r} is not a checkpoint file. Use 'auto' (the run "
            f"directory's newest checkpoint), a path such as RUN_DIR/checkpoints/step_00000100.pt, or leave it empty."
        )
    _check_schedule(cfg, source)
    _check_distill(cfg, source)
    if cfg.data.decode == "device" and cfg.data.mode == "memory":
        raise ConfigError(
            f"{source}: data.decode=device applies to stream mode only: memory mode decodes each split once, on "
            "the host, when it is loaded, and would ignore it. Set data.mode=stream to decode batches on the "
            "device, or data.decode=auto."
        )
    if check_data:
        _check_data_path(cfg, source)


def _check_schedule(cfg: Config, source: str) -> None:
    o, t = cfg.optim, cfg.train
    if o.schedule == "step" and not o.step_epochs:
        raise ConfigError(
            f"{source}: optim.schedule=step needs optim.step_epochs, the epochs at which the lr is multiplied by "
            f"optim.step_gamma (e.g. optim.step_epochs=[30,60]); or choose schedule cosine or constant."
        )
    if list(o.step_epochs) != sorted(o.step_epochs):
        raise ConfigError(f"{source}: optim.step_epochs={list(o.step_epochs)} must be in increasing order.")
    if o.step_epochs and o.schedule != "step":
        raise ConfigError(
            f"{source}: optim.step_epochs is set but optim.schedule={o.schedule}; "
            "set optim.schedule=step or remove step_epochs."
        )
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"{source}: train.batch_size={t.batch_size} is not divisible by "
            f"train.grad_accum_steps={t.grad_accum_steps}; "
            f"the global batch is split into that many micro-batches."
        )


def _check_distill(cfg: Config, source: str) -> None:
    d = cfg.distill
    if d.type == "none":
        if d.teacher:
            raise ConfigError(
                f"{source}: distill.teacher is set but distill.type=none; choose distill.type=soft or hard."
            )
        return
    if not d.teacher:
        raise ConfigError(
            f"{source}: distill.type={d.type} needs distill.teacher: a distvit checkpoint or run directory, or a "
            f"timm model name such as deit_base_patch16_224 (with distill.teacher_weights)."
        )
    if not Path(os.path.expanduser(d.teacher)).exists():
        import timm

        if not timm.is_model(d.teacher):
            close = difflib.get_close_matches(d.teacher, timm.list_models(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{source}: distill.teacher={d.teacher!r} is neither an existing checkpoint/run directory nor a timm "
                f"model name{hint}."
            )
        if isinstance(d.teacher_weights, str) and not Path(os.path.expanduser(d.teacher_weights)).is_file():
            raise ConfigError(
                f"{source}: distill.teacher_weights={d.teacher_weights!r} is not a weights file "
                "(or true for hub weights)."
            )
        if d.teacher_weights is False:
            raise ConfigError(
                f"{source}: distill.teacher_weights=false would distil from a random teacher; "
                "pass true or a weights file."
            )


def _check_data_path(cfg: Config, source: str) -> None:
    prepare_hint = "Create a dataset with `distvit prepare synthetic --out DIR` and set data.path=DIR."
    if not cfg.data.path:
        raise ConfigError(f"{source}: data.path is required (the dataset folder with {MANIFEST_NAME}). {prepare_hint}")
    if cfg.data.cache_dir and not cfg.data.remote:
        raise ConfigError(
            f"{source}: data.cache_dir is set but data.remote is not: the cache holds shards fetched from "
            "data.remote. Set data.remote (a URL or pipe: template, or a shared folder), or leave cache_dir empty."
        )
    if cfg.data.cache_dir and not cfg.data.cache_limit:
        raise ConfigError(
            f"{source}: data.cache_dir needs data.cache_limit, the bytes the cache may hold "
            "(e.g. data.cache_limit=50000000000 for 50 GB)."
        )
    if cfg.data.remote:
        if Path(cfg.data.path).exists() and not Path(cfg.data.path).is_dir():
            raise ConfigError(
                f"{source}: data.path={cfg.data.path!r} is a file; "
                "with data.remote it is the local folder the shards are fetched into."
            )
        return  # the manifest may still be remote
    folder = Path(cfg.data.path)
    if not folder.exists():
        raise ConfigError(f"{source}: data.path={cfg.data.path!r} does not exist. {prepare_hint}")
    if not folder.is_dir():
        raise ConfigError(
            f"{source}: data.path={cfg.data.path!r} is a file; it must be the dataset folder. {prepare_hint}"
        )
    if not (folder / MANIFEST_NAME).is_file():
        raise ConfigError(
            f"{source}: data.path={cfg.data.path!r} has no {MANIFEST_NAME}: it is not a distvit dataset, or "
            f"`distvit prepare` did not finish there (the manifest is written last). Run prepare again with "
            f"--out {cfg.data.path}."
        )
