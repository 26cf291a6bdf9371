"""Epoch planning: every sample exactly once per epoch, equal steps on every rank, any world size."""

from __future__ import annotations

import pytest
import torch

from distvit.data.plan import EpochPlan, epoch_order, num_steps, sequential_order, subset_indices

DATASET_SIZES = [1, 2, 7, 97, 101, 128, 1000, 1009]
WORLD_SIZES = [1, 2, 3, 4, 8]


def union_of_valid(order, global_batch, world_size):
    plans = [EpochPlan(order, global_batch, world_size, rank) for rank in range(world_size)]
    seen, steps = [], []
    for plan in plans:
        steps.append(len(list(plan.batches())))
        for batch in plan.batches():
            assert batch.indices.numel() == global_batch // world_size  # fixed shape on every step
            seen += batch.indices[batch.valid].tolist()
    return seen, steps


@pytest.mark.parametrize("num_samples", DATASET_SIZES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_exactly_once_and_equal_steps(num_samples, world_size):
    global_batch = 8 * world_size if world_size != 3 else 24
    order = epoch_order(num_samples, seed=5, epoch=2)
    seen, steps = union_of_valid(order, global_batch, world_size)
    assert sorted(seen) == list(range(num_samples))
    assert len(set(steps)) == 1 and steps[0] == num_steps(num_samples, global_batch)


def test_step_composition_does_not_depend_on_world_size():
    order = epoch_order(1009, seed=1, epoch=0)
    reference = EpochPlan(order, 48, 1, 0)
    for world_size in (2, 3, 4, 8, 16):
        plans = [EpochPlan(order, 48, world_size, rank) for rank in range(world_size)]
        for step in range(len(reference)):
            joined = torch.cat([plan.batch(step).indices[plan.batch(step).valid] for plan in plans])
            single = reference.batch(step)
            assert torch.equal(joined, single.indices[single.valid])
            assert all(plan.batch(step).global_valid == single.global_valid for plan in plans)


def test_last_step_is_padded_and_masked():
    plan = EpochPlan(sequential_order(10), global_batch=8, world_size=2, rank=1)
    last = plan.batch(1)
    # slots 8..9 belong to rank 0; rank 1 has only padding in the last step but still takes the step
    assert last.valid.tolist() == [False] * 4
    assert last.global_valid == 2
    rank0 = EpochPlan(sequential_order(10), 8, 2, 0).batch(1)
    assert rank0.indices[rank0.valid].tolist() == [8, 9]


def test_order_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_order(500, 3, 1), epoch_order(500, 3, 1))
    assert not torch.equal(epoch_order(500, 3, 1), epoch_order(500, 3, 2))
    assert not torch.equal(epoch_order(500, 3, 1), epoch_order(500, 4, 1))
    assert sorted(epoch_order(500, 3, 1).tolist()) == list(range(500))


def test_indivisible_global_batch_is_refused():
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        EpochPlan(sequential_order(10), 8, 3, 0)


@pytest.mark.parametrize(
    "world_before, world_after, batch_after", [(2, 2, 16), (2, 1, 16), (2, 4, 16), (4, 3, 24), (2, 2, 20), (2, 3, 30)]
)
def test_resume_mid_epoch_sees_each_remaining_sample_once(world_before, world_after, batch_after):
    order = epoch_order(101, seed=3, epoch=1)
    before = [EpochPlan(order, 16, world_before, r) for r in range(world_before)]
    seen = []
    for step in range(3):  # stop after 3 steps = 48 samples
        for plan in before:
            batch = plan.batch(step)
            seen += batch.indices[batch.valid].tolist()
    consumed = 3 * 16
    after = [EpochPlan(order, batch_after, world_after, r, start_sample=consumed) for r in range(world_after)]
    assert len({len(p) for p in after}) == 1  # equal steps after the resume too
    for plan in after:
        for batch in plan.batches():
            seen += batch.indices[batch.valid].tolist()
    assert sorted(seen) == list(range(101))
    assert seen[:consumed] == order[:consumed].tolist()


def test_subset_is_fixed_by_seed_and_size():
    a = subset_indices(1000, 100, seed=0)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and torch.equal(a, subset_indices(1000, 100, seed=0))
    assert not torch.equal(a, subset_indices(1000, 100, seed=1))
    assert torch.equal(a, a.sort().values)
