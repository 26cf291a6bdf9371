"""distvit.engine.seeds: per-step augmentation seeds."""

from __future__ import annotations

from distvit.engine.seeds import step_seed


def test_step_seed_depends_on_each_argument_only():
    seed = step_seed(0, 1, 64)
    assert seed == step_seed(0, 1, 64) == 3958615999  # pinned: resumed runs must redraw the same augmentation
    assert isinstance(seed, int) and 0 <= seed < 2**32
    others = [step_seed(1, 1, 64), step_seed(0, 2, 64), step_seed(0, 1, 65), step_seed(0, 64, 1)]
    assert len({seed, *others}) == 5
