"""Which sample each slot of each epoch holds, and what a resume may change about it.

An epoch's order is a function of its `OrderSettings` only (dataset, split, subset, seed, shuffle mode
and window, repeats); the slots of a step follow from the global batch (distvit.data.plan). A checkpoint
records the settings of the epoch in progress and the global batch, and a resume compares them with the
new config's, field by field (`compare`):

- identity (dataset, split, subset, seed): every epoch's order and the subset follow from them; a change
  is refused with one error naming the key, the stopped run's value and the new one.
- per epoch (shuffle, shuffle_window, repeats): an epoch's order is fixed once the epoch began, so the
  epoch in progress finishes with the stopped run's settings and the new ones apply from the next epoch
  (each epoch still holds every sample exactly `repeats` times).
- per step (global batch, world size): the remaining slots of the epoch are taken in the same order
  whatever their split into steps and ranks, so a change applies at the resumed step.

`order_settings` is the one place that reads the config for the order (the data section, with the seed
and the augmentation's repeats); a test changes every config key in turn and fails when the order changes
but the settings do not (tests/unit/engine/test_order.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from distvit.augment.recipe import NONE, PRESETS, recipe_of, recipe_settings
from distvit.config import MOVED_KEYS, AugmentConfig, DataConfig, MixConfig
from distvit.data.manifest import Manifest
from distvit.data.plan import EpochPlan, epoch_order, num_steps, subset_indices, window_order
from distvit.engine.mixing import mix_settings
from distvit.errors import CheckpointError


@dataclass(frozen=True)
class OrderSettings:
    """Everything an epoch's sample order depends on."""

    manifest: str
    """Fingerprint of the dataset's manifest (bad shards left out)."""
    split: str
    subset: int
    """data.train_subset (0: the whole split)."""
    seed: int
    shuffle: str
    """The resolved data.shuffle: 'global' or 'window'."""
    shuffle_window: int
    """Shards per window (0 with a global shuffle)."""
    repeats: int
    """Appearances of each sample per epoch (repeated augmentation)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KEYS = {
    "manifest": "data.path (the dataset's manifest)",
    "split": "data.train_split",
    "subset": "data.train_subset",
    "seed": "train.seed",
    "shuffle": "data.shuffle",
    "shuffle_window": "data.shuffle_window",
    "repeats": "augment.repeats",
}
"""The config key behind each setting, for messages."""
IDENTITY = ("manifest", "split", "subset", "seed")
PER_EPOCH = ("shuffle", "shuffle_window", "repeats")


def order_settings(data: DataConfig, manifest: Manifest, *, seed: int, augment: AugmentConfig) -> OrderSettings:
    """The settings of a run's epochs as its config asks for them (data.shuffle=auto: window order when
    streaming through data.cache_dir, whose cache holds a window at a time, else a global permutation);
    `seed`: train.seed; `augment`: the augment section, whose recipe says how often each sample repeats."""
    shuffle = data.shuffle if data.shuffle != "auto" else ("window" if data.cache_dir else "global")
    return OrderSettings(
        manifest=manifest.fingerprint(),
        split=data.train_split,
        subset=data.train_subset,
        seed=seed,
        shuffle=shuffle,
        shuffle_window=data.shuffle_window if shuffle == "window" else 0,
        repeats=recipe_of(augment).repeats,
    )


def settings_of_checkpoint(payload: dict[str, Any]) -> OrderSettings:
    """The order settings a checkpoint records (distvit before 0.2 recorded the config only: derived from it)."""
    data = payload["data"]
    if "order" in data:
        return OrderSettings(**data["order"])
    config = payload.get("config", {})
    data_cfg, augment = config.get("data", {}), config.get("augment", {})
    shuffle = data_cfg.get("shuffle", "global")
    if shuffle == "auto":
        shuffle = "window" if data_cfg.get("cache_dir") else "global"
    preset = augment.get("preset", data_cfg.get("augment", ""))  # data.augment before it moved to augment.preset
    preset_repeats = PRESETS.get(preset, NONE).repeats
    return OrderSettings(
        manifest=data["manifest"],
        split=data["split"],
        subset=int(data.get("subset", 0)),
        seed=int(data["seed"]),
        shuffle=shuffle,
        shuffle_window=int(data_cfg.get("shuffle_window", 0)) if shuffle == "window" else 0,
        repeats=int(augment.get("repeats") or preset_repeats),
    )


def augmentation_settings(augment: AugmentConfig, mix: MixConfig) -> dict[str, Any]:
    """How a step's samples are augmented and mixed, by config key: the resolved recipe (repeats aside:
    they are part of the order) and the mixing settings. Recorded in checkpoints so a resume can say what
    it changes."""
    return {**recipe_settings(recipe_of(augment)), **mix_settings(mix)}


def augmentation_changes(saved: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """'KEY old -> new, ...' for every augmentation setting a resume changes ('' for none, or for a
    checkpoint that did not record them). A checkpoint written before keys moved (data.crop_padding,
    data.mixup_alpha, ...) recorded them under their old names: read under the new ones."""
    if not isinstance(saved, dict):
        return ""
    saved = {MOVED_KEYS.get(key, key): value for key, value in saved.items()}
    return ", ".join(f"{key} {saved.get(key)!r} -> {value!r}" for key, value in new.items() if saved.get(key) != value)


def _shown(name: str, value: Any) -> str:
    return f"{value[:12]}..." if name == "manifest" else repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class ResumeOrder:
    """What a resume does with the order: the settings the epoch in progress keeps (None: the new ones
    from the resumed epoch on) and the notes that say so."""

    kept: OrderSettings | None
    notes: list[str]


def compare(saved: OrderSettings, new: OrderSettings, epoch: int, samples_in_epoch: int, source: str) -> ResumeOrder:
    """Refuse a change of identity; keep the stopped run's per-epoch settings for the epoch in progress.
    `epoch`: completed epochs; `samples_in_epoch`: slots of the next epoch already trained on."""
    changed = [name for name in KEYS if getattr(saved, name) != getattr(new, name)]
    refused = [name for name in changed if name in IDENTITY]
    if refused:
        what = "; ".join(
            f"{KEYS[name]} is {_shown(name, getattr(new, name))}, the stopped run's was "
            f"{_shown(name, getattr(saved, name))}"
            for name in refused
        )
        raise CheckpointError(
            f"cannot resume from {source}: {what}. Every epoch's sample order depends on it: resume with the "
            "stopped run's value (RUN_DIR/config.yaml), or start a new run."
        )
    if not changed:
        return ResumeOrder(None, [])
    what = ", ".join(
        f"{KEYS[name]} {_shown(name, getattr(saved, name))} -> {_shown(name, getattr(new, name))}" for name in changed
    )
    if samples_in_epoch:
        note = (
            f"distvit: note: {what} on resume: epoch {epoch + 1} is under way and finishes in the order it began "
            f"with (every sample exactly once); the new setting applies from epoch {epoch + 2}."
        )
        return ResumeOrder(saved, [note])
    return ResumeOrder(None, [f"distvit: note: {what} on resume: applies from epoch {epoch + 1}."])


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: completed epochs, slots of the next one trained, and the order
    settings that epoch keeps (None: the run's own; see distvit.engine.order.compare)."""

    epoch: int = 0
    samples: int = 0
    kept: OrderSettings | None = None


class EpochOrders:
    """Each epoch's order and this rank's plan of it. The epoch a resume continues keeps the settings it
    began with (`keep`); every other epoch uses the run's own."""

    def __init__(
        self, settings: OrderSettings, shard_sizes: list[int], train_size: int, global_batch: int, world: int, rank: int
    ):
        """`shard_sizes`: samples per shard of the training split, in stored order (window order);
        `train_size`: samples in the split."""
        self.settings, self.shard_sizes = settings, shard_sizes
        self.global_batch, self.world, self.rank = global_batch, world, rank
        self.train_size = train_size
        self.subset = subset_indices(self.train_size, settings.subset, settings.seed) if settings.subset else None
        self.num_train = settings.subset or self.train_size
        self._kept: tuple[int, OrderSettings] | None = None

    def keep(self, epoch: int, settings: OrderSettings) -> None:
        """Epoch `epoch` (0-based) is under way with `settings` (from the checkpoint a run resumes)."""
        self._kept = (epoch, settings)

    def settings_of(self, epoch: int) -> OrderSettings:
        if self._kept is not None and self._kept[0] == epoch:
            return self._kept[1]
        return self.settings

    def steps_of(self, epoch: int) -> int:
        return num_steps(self.num_train * self.settings_of(epoch).repeats, self.global_batch)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of an epoch with the run's own settings (what the schedule is planned in)."""
        return num_steps(self.num_train * self.settings.repeats, self.global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's samples in order; with repeats, each sample's copies next to each other (so they
        share a global batch, as DeiT's repeated-augmentation sampler puts them), each augmented anew
        because a sample's augmentation follows its slot."""
        settings = self.settings_of(epoch)
        if settings.shuffle == "window":
            order = window_order(self.shard_sizes, settings.seed, epoch, settings.shuffle_window)
            order = order[torch.isin(order, self.subset)] if self.subset is not None else order
        else:
            order = epoch_order(self.num_train, settings.seed, epoch)
            order = self.subset[order] if self.subset is not None else order
        return order.repeat_interleave(settings.repeats) if settings.repeats > 1 else order

    def plan(self, epoch: int, start_sample: int = 0) -> tuple[EpochPlan, slice]:
        """This rank's plan of `epoch` from slot `start_sample` on, and its slice of each global batch."""
        order = self.order(epoch)
        if start_sample > len(order):  # only a checkpoint from another order gets here (see compare)
            raise CheckpointError(
                f"the checkpoint stopped {start_sample} slots into epoch {epoch + 1}, which has {len(order)}: it "
                "was written with other order settings. Resume with the run's own config (RUN_DIR/config.yaml)."
            )
        plan = EpochPlan(order, self.global_batch, self.world, self.rank, start_sample=start_sample)
        return plan, slice(self.rank * plan.local_batch, (self.rank + 1) * plan.local_batch)
