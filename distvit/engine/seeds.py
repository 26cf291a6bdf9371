"""Random streams: each step's augmentation seed, and the RNG state a checkpoint keeps per rank."""

from __future__ import annotations

import numpy as np
import torch


def step_seed(seed: int, epoch: int, first_slot: int) -> int:
    """Seed of one step's augmentation: a function of (seed, epoch, position in the epoch) only."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, first_slot]).generate_state(1)[0])


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state
