"""Config rules that need the dataset's manifest or this host's cores and memory (and so the augmentation
recipe and the model's geometry, which the config layer cannot import): run by every config-driven
command before any shard is hashed, and so before any run folder exists."""

from __future__ import annotations

from distvit.config import Config
from distvit.data.manifest import Manifest, readable_bytes
from distvit.errors import ConfigError


def check_with_dataset(cfg: Config, manifest: Manifest) -> None:
    """Rules that need the dataset's manifest or this host's cores and memory: run by every config-driven
    command (load_checked_config) before any shard is hashed, and so before any run folder exists."""
    _check_threads(cfg)
    _check_memory_mode(cfg, manifest)
    _check_crop_padding(cfg, manifest)


def _check_threads(cfg: Config) -> None:
    from distvit.data.node import local_ranks, usable_cores

    cores, ranks = usable_cores(), local_ranks()[1]
    per_rank = max(1, cores // ranks)
    if cfg.train.cpu_threads > per_rank:
        share = f"each of the {ranks} ranks on this node" if ranks > 1 else "this process"
        raise ConfigError(
            f"train.cpu_threads={cfg.train.cpu_threads} is more than the {per_rank} core(s) {share} can use "
            f"({cores} usable here): threads beyond the cores only wait for each other, so training gets "
            f"slower, not faster. Choose at most {per_rank}, or 0 for that many."
        )


def _check_memory_mode(cfg: Config, manifest: Manifest) -> None:
    """data.mode=memory decodes both splits into memory at start: refused here, before the run folder is
    written, when this host cannot hold them (data.mode=auto streams instead by itself)."""
    from distvit.data.node import available_host_memory
    from distvit.data.read.memory import decoded_bytes

    if cfg.data.mode != "memory" or cfg.data.cache_dir:  # through a shard cache every split streams
        return
    splits = [cfg.data.train_split, cfg.data.eval_split]
    needed, available = decoded_bytes(manifest, splits), available_host_memory()
    if available is not None and needed > available:
        height, width = manifest.image_size
        raise ConfigError(
            f"data.mode=memory: splits {splits[0]!r} and {splits[1]!r} of {cfg.data.path} decode to "
            f"{readable_bytes(needed)} ({width} x {height} px images), more than the {readable_bytes(available)} of "
            "memory this host has available. Use data.mode=stream (decode from the shards as batches need them) "
            "or data.mode=auto (memory only where the splits fit)."
        )


def _check_crop_padding(cfg: Config, manifest: Manifest) -> None:
    """The random crop pads every image by augment.crop_padding on each side, at the size the reader delivers
    (the stored size; the model's input size for datasets of varying sizes)."""
    from distvit.augment import recipe_of

    padding = cfg.augment.crop_padding
    if recipe_of(cfg.augment).crop != "pad" or not padding:
        return
    if manifest.image_size is not None:
        side, what = min(manifest.image_size), f"the stored images of {cfg.data.path}"
    else:
        side, what = _model_input_size(cfg), "the images as the reader delivers them (resized to the model input)"
        if side is None:
            return  # an unknown model name: check_model_config says so
    if padding > side // 2:
        raise ConfigError(
            f"augment.crop_padding={padding} is more than half the side of {what} ({side} px): a random crop "
            "could keep less than half the image, or none of it, and each padded image takes "
            f"(side + 2 x padding)^2 pixels. Choose at most {side // 2} (CIFAR-style training pads 32 px images by 4)."
        )


def _model_input_size(cfg: Config) -> int | None:
    import timm

    if cfg.surgery.img_size:
        return cfg.surgery.img_size
    if not timm.is_model(cfg.model.name):
        return None
    from distvit.model.build import native_geometry

    return native_geometry(cfg.model.name)[0]
