"""distvit.engine.sources: training and evaluation data, the subset and each rank's epoch plan."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from distvit.config import AugmentConfig, DataConfig, TrainConfig
from distvit.data.manifest import read_manifest
from distvit.data.plan import epoch_order
from distvit.engine.order import order_settings
from distvit.engine.sources import DataSources, agree_on_bad_shards
from distvit.errors import DataError


def sources_of(data_cfg: DataConfig, train_cfg: TrainConfig, manifest, repeats: int = 1) -> DataSources:
    """DataSources on one CPU rank, with the order settings the trainer would derive from these sections."""
    order = order_settings(data_cfg, manifest, seed=train_cfg.seed, augment=AugmentConfig(repeats=repeats))
    return DataSources(
        data_cfg,
        manifest=manifest,
        accelerator=Accelerator(cpu=True),
        img_size=32,
        order=order,
        global_batch=train_cfg.batch_size,
    )


def test_plan_subset_and_steps(small_dataset):
    data_cfg = DataConfig(path=str(small_dataset), mode="memory", train_subset=120)
    sources = sources_of(data_cfg, TrainConfig(batch_size=50, seed=3), read_manifest(small_dataset))
    assert (sources.train_size, sources.num_train, sources.steps_per_epoch, len(sources.eval)) == (200, 120, 3, 101)
    order = sources.epoch_order(1)
    assert torch.equal(order, sources.subset[epoch_order(120, 3, 1)])
    assert len(set(order.tolist())) == 120 and set(order.tolist()) <= set(range(200))
    plan, local = sources.epoch_plan(1, start_sample=50)
    assert len(plan) == 2 and local == slice(0, 50)
    with pytest.raises(DataError, match="data.train_subset=300 exceeds the 200 training images"):
        sources_of(DataConfig(path=str(small_dataset), train_subset=300), TrainConfig(), read_manifest(small_dataset))


def test_bad_shards_stop_or_are_left_out(small_dataset):
    manifest = read_manifest(small_dataset)
    shard = manifest.splits["train"].shards[0].name
    accelerator = Accelerator(cpu=True)
    assert agree_on_bad_shards(DataConfig(path=str(small_dataset)), manifest, {}, accelerator) is manifest
    with pytest.raises(DataError, match=shard):
        agree_on_bad_shards(DataConfig(path=str(small_dataset)), manifest, {shard: "truncated"}, accelerator)
    kept = agree_on_bad_shards(
        DataConfig(path=str(small_dataset), bad_shards="skip"), manifest, {shard: "truncated"}, accelerator
    )
    assert shard not in [s.name for s in kept.splits["train"].shards]
    assert kept.splits["train"].num_samples == 200 - manifest.splits["train"].shards[0].num_samples


@pytest.mark.parametrize("shuffle", ["global", "window"])
def test_repeated_augmentation_shows_each_sample_k_times_per_epoch_whatever_the_world_size(small_dataset, shuffle):
    from distvit.data.plan import EpochPlan

    manifest = read_manifest(small_dataset)
    data_cfg = DataConfig(path=str(small_dataset), mode="memory", train_subset=90, shuffle=shuffle, shuffle_window=2)
    sources = sources_of(data_cfg, TrainConfig(batch_size=24, seed=1), manifest, repeats=3)
    assert sources.steps_per_epoch == 12  # ceil(3 x 90 / 24)
    order = sources.epoch_order(2)
    counts = torch.bincount(order, minlength=200)
    assert sorted(set(counts.tolist())) == [0, 3] and int((counts == 3).sum()) == 90
    assert torch.equal(order[0::3], order[1::3]) and torch.equal(order[0::3], order[2::3])  # copies side by side
    assert not torch.equal(order, sources.epoch_order(3))
    for world in (1, 2, 3):  # each of the 90 samples exactly 3 times over the ranks, 12 steps on each
        seen = torch.zeros(200, dtype=torch.long)
        for rank in range(world):
            plan = EpochPlan(order, 24, world, rank)
            assert len(plan) == 12
            for batch in plan.batches():
                seen += torch.bincount(batch.indices[batch.valid], minlength=200)
        assert torch.equal(seen, counts)
