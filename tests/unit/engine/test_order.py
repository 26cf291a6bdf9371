"""distvit.engine.order: what an epoch's order depends on, and what a resume may change.

Three kinds of test: the rules on examples; a property test (hypothesis) that draws runs of stops and
resumes with settings changed in between and checks the plan's guarantees on every rank; and a test that
changes every config key in turn and fails when the samples a step reads (or how they are augmented)
change while the settings a checkpoint records do not: a new key that affects the order cannot escape
the resume check."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distvit.augment import Augmenter, recipe_of
from distvit.augment.transforms import BatchTransform
from distvit.config import Config, load_config
from distvit.data.read.memory import SplitTensors
from distvit.engine.order import (
    IDENTITY,
    KEYS,
    EpochOrders,
    OrderSettings,
    augmentation_settings,
    compare,
    order_settings,
    settings_of_checkpoint,
)
from distvit.engine.sources import DataSources, StepInput
from distvit.engine.step import TrainStep
from distvit.errors import CheckpointError, ConfigError

BASE = OrderSettings(manifest="f" * 64, split="train", subset=0, seed=0, shuffle="global", shuffle_window=0, repeats=1)


def test_a_changed_identity_is_refused_naming_the_key_and_both_values():
    with pytest.raises(CheckpointError) as caught:
        compare(BASE, dataclasses.replace(BASE, subset=50, seed=3), epoch=1, samples_in_epoch=20, source="c.pt")
    assert str(caught.value) == (
        "cannot resume from c.pt: data.train_subset is 50, the stopped run's was 0; train.seed is 3, the stopped "
        "run's was 0. Every epoch's sample order depends on it: resume with the stopped run's value "
        "(RUN_DIR/config.yaml), or start a new run."
    )


def test_a_per_epoch_change_waits_for_the_epoch_under_way_and_applies_at_once_between_epochs():
    window = dataclasses.replace(BASE, shuffle="window", shuffle_window=4, repeats=2)
    kept = compare(BASE, window, epoch=1, samples_in_epoch=20, source="c.pt")
    assert kept.kept == BASE and kept.notes == [
        "distvit: note: data.shuffle 'global' -> 'window', data.shuffle_window 0 -> 4, augment.repeats 1 -> 2 on "
        "resume: epoch 2 is under way and finishes in the order it began with (every sample exactly once); the "
        "new setting applies from epoch 3."
    ]
    at_boundary = compare(BASE, window, epoch=1, samples_in_epoch=0, source="c.pt")
    assert at_boundary.kept is None and at_boundary.notes[0].endswith("on resume: applies from epoch 2.")
    assert compare(BASE, BASE, 1, 20, "c.pt").notes == []


def test_the_epoch_a_resume_continues_keeps_its_settings():
    new = dataclasses.replace(BASE, repeats=3)
    orders = EpochOrders(new, [10, 10, 10], 30, global_batch=8, world=2, rank=1)
    orders.keep(1, BASE)
    assert orders.settings_of(1) == BASE and orders.settings_of(2) == new
    assert len(orders.order(1)) == 30 and len(orders.order(2)) == 90
    assert orders.steps_of(1) == 4 and orders.steps_of(2) == orders.steps_per_epoch == 12
    with pytest.raises(CheckpointError, match="stopped 40 slots into epoch 2, which has 30"):
        orders.plan(1, start_sample=40)


def test_checkpoints_of_earlier_versions_give_their_settings_from_their_config():
    payload = {
        "data": {"manifest": "a" * 64, "split": "train", "seed": 4, "subset": 0, "epoch": 1, "samples_in_epoch": 8},
        "config": {"data": {"shuffle": "auto", "cache_dir": "/c", "shuffle_window": 3, "augment": "deit"}},
    }
    assert settings_of_checkpoint(payload) == OrderSettings("a" * 64, "train", 0, 4, "window", 3, 3)
    recorded = {**payload, "data": {**payload["data"], "order": BASE.to_dict()}}
    assert settings_of_checkpoint(recorded) == BASE
    # the preset under its present key (augment.preset; data.augment before it moved)
    moved = {**payload, "config": {"data": {"shuffle": "global"}, "augment": {"preset": "deit", "repeats": None}}}
    assert settings_of_checkpoint(moved) == OrderSettings("a" * 64, "train", 0, 4, "global", 0, 3)


def test_augmentation_settings_are_recorded_by_config_key_and_read_back_from_earlier_checkpoints():
    from distvit.config import AugmentConfig, MixConfig
    from distvit.engine.order import augmentation_changes

    settings = augmentation_settings(AugmentConfig(crop_padding=2), MixConfig(mixup_alpha=0.8))
    assert settings["augment.crop_padding"] == 2 and settings["augment.hflip"] == 0.5
    assert {key: settings[key] for key in settings if key.startswith("mix.")} == {
        "mix.mixup_alpha": 0.8,
        "mix.cutmix_alpha": 0.0,
        "mix.prob": 1.0,
        "mix.switch_prob": 0.5,
    }
    assert "augment.repeats" not in settings and "augment.preset" not in settings  # the order; the parts
    assert augmentation_changes(settings, settings) == ""
    # a checkpoint written before the keys moved recorded data.crop_padding, data.mixup_alpha, data.mix_prob...
    old_names = {"data.crop_padding": "augment.crop_padding", "data.mixup_alpha": "mix.mixup_alpha"}
    old_names.update({"data.cutmix_alpha": "mix.cutmix_alpha", "data.mix_prob": "mix.prob"})
    old_names["data.mix_switch_prob"] = "mix.switch_prob"
    earlier = {next((old for old, new in old_names.items() if new == key), key): v for key, v in settings.items()}
    assert "data.mix_prob" in earlier and "mix.prob" not in earlier
    assert augmentation_changes(earlier, settings) == ""  # the same settings under their old names
    changed = augmentation_settings(AugmentConfig(crop_padding=2), MixConfig(mixup_alpha=0.8, prob=0.5))
    assert augmentation_changes(earlier, changed) == "mix.prob 1.0 -> 0.5"


# --- property: random runs of stops and resumes --------------------------------------------------------


@st.composite
def segments(draw):
    """A run: the dataset's shards, then 1-4 launches, each with a world size, a global batch, order
    settings (changed from the last launch's or not) and a stop after some steps (the last runs to the end)."""
    shard_sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    total = sum(shard_sizes)
    subset = draw(st.sampled_from([0, 0, max(1, total // 2), total]))
    seed = draw(st.integers(0, 3))
    launches = []
    for index in range(draw(st.integers(1, 4))):
        world = draw(st.sampled_from([1, 2, 3]))
        shuffle = draw(st.sampled_from(["global", "window"]))
        launches.append(
            dict(
                world=world,
                batch=world * draw(st.integers(1, 4)),
                settings=OrderSettings(
                    manifest="m",
                    split="train",
                    # identity changes are drawn rarely: a refused launch changes nothing
                    subset=subset if draw(st.integers(0, 9)) else draw(st.sampled_from([0, 1, total])),
                    seed=seed if draw(st.integers(0, 9)) else seed + 1,
                    shuffle=shuffle,
                    shuffle_window=draw(st.integers(1, len(shard_sizes))) if shuffle == "window" else 0,
                    repeats=draw(st.integers(1, 3)),
                ),
                stop_after=draw(st.integers(1, 12)),
            )
        )
    return shard_sizes, subset, seed, launches


def _simulate(shard_sizes, launches, epochs=3):
    """What the trainer does across launches, on every rank: plan each epoch from its settings, trace the
    valid samples, checkpoint (epoch, samples in epoch, the epoch's settings) at the stop, compare on resume.
    Returns {epoch: Counter of samples trained on} and {completed epoch: its repeats}."""
    total = sum(shard_sizes)
    traced: dict[int, Counter] = {}
    repeats_of: dict[int, int] = {}
    checkpoint = None
    for number, launch in enumerate(launches):
        settings, world = launch["settings"], launch["world"]
        orders = [EpochOrders(settings, shard_sizes, total, launch["batch"], world, rank) for rank in range(world)]
        epoch, samples = 0, 0
        if checkpoint is not None:
            try:
                resumed = compare(checkpoint["settings"], settings, checkpoint["epoch"], checkpoint["samples"], "c.pt")
            except CheckpointError as err:
                changed = [k for k in IDENTITY if getattr(settings, k) != getattr(checkpoint["settings"], k)]
                assert changed and all(f"{KEYS[k]} is {getattr(settings, k)}" in str(err) for k in changed)
                continue  # refused before training: nothing changed
            if resumed.kept is not None:
                for rank_orders in orders:
                    rank_orders.keep(checkpoint["epoch"], resumed.kept)
            epoch, samples = checkpoint["epoch"], checkpoint["samples"]
        steps_left = None if number == len(launches) - 1 else launch["stop_after"]
        while epoch < epochs and steps_left != 0:
            plans = [rank_orders.plan(epoch, samples)[0] for rank_orders in orders]
            assert len({len(plan) for plan in plans}) == 1, "ranks plan different step counts"
            for step in range(len(plans[0])):
                batches = [plan.batch(step) for plan in plans]
                for batch in batches:
                    traced.setdefault(epoch, Counter()).update(batch.indices[batch.valid].tolist())
                samples += batches[0].global_valid
                steps_left = None if steps_left is None else steps_left - 1
                if step == len(plans[0]) - 1:
                    repeats_of[epoch] = orders[0].settings_of(epoch).repeats
                    epoch, samples = epoch + 1, 0
                if steps_left == 0:
                    break
        checkpoint = {"epoch": epoch, "samples": samples, "settings": orders[0].settings_of(epoch)}
    return traced, repeats_of


PROPERTY_EXAMPLES = int(os.environ.get("DISTVIT_PROPERTY_EXAMPLES", "300"))


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments())
def test_every_epoch_holds_every_sample_repeats_times_across_any_stops_resumes_and_changes(run):
    shard_sizes, subset, seed, launches = run
    traced, repeats_of = _simulate(shard_sizes, launches)
    total = sum(shard_sizes)
    orders = EpochOrders(launches[0]["settings"], shard_sizes, total, 1, 1, 0)  # a refused launch changes nothing
    members = orders.subset.tolist() if orders.subset is not None else list(range(total))
    for epoch, counts in traced.items():
        if epoch in repeats_of:  # completed epochs: exactly `repeats` times each
            assert counts == Counter({i: repeats_of[epoch] for i in members}), f"epoch {epoch + 1}"
        else:  # the epoch a last refused launch left open: never more copies than an epoch holds
            assert set(counts) <= set(members) and max(counts.values()) <= 3


# --- every config key: the order and the augmentation cannot depend on an unrecorded key -------------------


def _leaf_keys() -> list[tuple[str, str, typing.Any]]:
    cfg = Config()
    hints = {
        section.name: typing.get_type_hints(type(getattr(cfg, section.name))) for section in dataclasses.fields(cfg)
    }
    return [
        (section, field.name, hints[section][field.name])
        for section in hints
        for field in dataclasses.fields(getattr(cfg, section))
    ]


def _candidates(annotation, value) -> list[str]:
    """Other values a key of this type may take (tried in turn until one validates)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _candidates(args[0], value)
    if origin is typing.Literal:
        return [str(choice) for choice in args if choice != value]
    if origin is typing.Union:
        return [c for arg in args if arg is not type(None) for c in _candidates(arg, value)]
    if annotation is bool:
        return ["false" if value else "true"]
    if annotation is int:
        base = value or 0
        return [str(base + 1), str(base + 2), str(max(1, base // 2)), "3", "16"]
    if annotation is float:
        base = value or 0.0
        return [str(base * 0.5 + 0.25), "0.1", "0.9", "2.0", "1e-06"]
    if annotation is str:
        return ["auto", "/tmp/elsewhere", "test", "train", "backbone"]
    if origin in (list, tuple):
        return ["[0.3, 0.6]", "[1.0]"]
    return []


# Keys a single override cannot change validly on their own, each with the reason; a new key that cannot
# be perturbed lands here only by a deliberate edit.
UNPERTURBED = {
    "optim.step_epochs": "valid only with optim.schedule=step (not an order or augmentation input)",
    "distill.teacher": "must name an existing teacher (the loss, not the order)",
    "distill.type": "needs distill.teacher (the loss, not the order)",
}


def _order_of(cfg: Config, manifest) -> OrderSettings:
    """The order settings the trainer derives from a config."""
    return order_settings(cfg.data, manifest, seed=cfg.train.seed, augment=cfg.augment)


def _signature(cfg: Config, manifest, data: dict) -> tuple:
    """Which samples each step of epochs 1-3 reads on one rank, and the first steps' model inputs."""
    accelerator = Accelerator(cpu=True)
    sources = DataSources(
        cfg.data,
        manifest=manifest,
        accelerator=accelerator,
        img_size=32,
        order=_order_of(cfg, manifest),
        global_batch=cfg.train.batch_size,
        splits=data,
    )
    steps = []
    for epoch in range(3):
        plan, _ = sources.epoch_plan(epoch)
        steps.append([(b.first_slot, tuple(b.indices[b.valid].tolist())) for b in plan.batches()])
    transform = BatchTransform((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    parts = SimpleNamespace(
        trained=torch.nn.Linear(1, 1),
        features_cached=False,
        augment=Augmenter(recipe_of(cfg.augment), transform),  # as build_parts makes it
        transform=transform,
        record=SimpleNamespace(num_classes=10),
    )
    step = TrainStep(parts, train=cfg.train, optim=cfg.optim, mix=cfg.mix, accelerator=accelerator)
    plan, local = sources.epoch_plan(0)
    inputs = []
    for batch in list(plan.batches())[:2]:
        images, labels = data["train"].images[batch.indices], data["train"].labels[batch.indices]
        x, _, _ = step.model_input(StepInput(batch, images, labels, local, plan.global_batch, 0))
        inputs.append(x)
    return steps, inputs


def test_every_config_key_that_changes_the_order_or_the_augmentation_is_recorded(small_dataset):
    from distvit.data.manifest import read_manifest

    manifest = read_manifest(small_dataset)
    generator = torch.Generator().manual_seed(0)
    data = {
        split: SplitTensors(
            torch.randint(
                0, 256, (manifest.splits[split].num_samples, 32, 32, 3), dtype=torch.uint8, generator=generator
            ),
            torch.randint(0, 10, (manifest.splits[split].num_samples,), generator=generator),
        )
        for split in ("train", "test")
    }
    unperturbed, affecting = set(), set()
    # from defaults, and from a base where the window, repeats, subset, RandAugment and mixing are on (a key
    # may matter only together with another one: the window only with data.shuffle=window)
    bases = [
        [],
        [
            "data.shuffle=window",
            "data.shuffle_window=2",
            "augment.preset=deit",
            "mix.mixup_alpha=0.8",
            "data.train_subset=100",
        ],
    ]
    for extra in bases:
        common = [f"data.path={small_dataset}", "train.batch_size=48", *extra]
        base = load_config(None, common, check_data=False)
        steps, inputs = _signature(base, manifest, data)
        untried = set()
        for section, key, annotation in _leaf_keys():
            name = f"{section}.{key}"
            if name in UNPERTURBED:
                continue
            tried = False
            for candidate in _candidates(annotation, getattr(getattr(base, section), key)):
                try:
                    cfg = load_config(None, [*common, f"{name}={candidate}"], check_data=False)
                except ConfigError:
                    continue
                if cfg == base or {cfg.data.train_split, cfg.data.eval_split} - set(data):
                    continue  # no change, or a split the dataset lacks (an error before any step)
                tried = True
                changed_steps, changed_inputs = _signature(cfg, manifest, data)
                order_changed = changed_steps != steps
                inputs_changed = len(inputs) != len(changed_inputs) or any(
                    not torch.equal(a, b) for a, b in zip(inputs, changed_inputs)
                )
                recorded_order = (_order_of(cfg, manifest), cfg.train.batch_size) != (
                    _order_of(base, manifest),
                    base.train.batch_size,
                )
                recorded_augmentation = augmentation_settings(cfg.augment, cfg.mix) != augmentation_settings(
                    base.augment, base.mix
                )
                if order_changed:
                    affecting.add(name)
                    assert recorded_order, f"{name}={candidate} changes which samples the steps read, unrecorded"
                if inputs_changed and not order_changed:
                    affecting.add(name)
                    assert recorded_augmentation or recorded_order, (
                        f"{name}={candidate} changes the augmentation, unrecorded"
                    )
            if not tried:
                untried.add(name)
        unperturbed = untried if not bases.index(extra) else unperturbed & untried
    assert not unperturbed, f"keys no override could change (add them to UNPERTURBED with the reason): {unperturbed}"
    # the test sees what it must: these keys change the order or the augmentation
    for name in (
        "train.seed",
        "train.batch_size",
        "data.train_subset",
        "augment.repeats",
        "data.shuffle",
        "augment.hflip",
    ):
        assert name in affecting, name
