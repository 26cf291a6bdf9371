"""RandAugment: the operations are timm's DeiT policy, each does what its name says, magnitudes follow
the configured mean and spread, and the grouped batch application equals one sample at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distvit.augment import PRESETS, AugmentParams
from distvit.augment.randaugment import OP_NAMES, OPS, rand_augment

FILL = torch.tensor([0.5, 0.5, 0.5])
TIMM_INCREASING = [  # timm's _RAND_INCREASING_TRANSFORMS (rand-m9-mstd0.5-inc1, DeiT's policy)
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
]  # fmt: skip


def _x(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return (torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)) / 255).float()


def _op(name: str, x: torch.Tensor, level: float) -> torch.Tensor:
    return OPS[name](x, torch.full((len(x),), level), FILL)


def test_the_operations_are_deits_policy():
    assert OP_NAMES == TIMM_INCREASING


def test_drawn_operations_and_magnitudes_follow_the_config():
    recipe = dataclasses.replace(PRESETS["deit"], randaugment_magnitude=9, randaugment_std=0.5, randaugment_prob=0.5)
    params = AugmentParams.sample(recipe, 20000, (16, 16), (16, 16), torch.Generator().manual_seed(0))
    ops, levels = params.ra_ops, params.ra_levels
    assert ops.shape == levels.shape == (20000, 2)
    applied = ops >= 0
    assert 0.48 < float(applied.float().mean()) < 0.52  # each drawn op applied with p = 0.5
    counts = torch.bincount(ops[applied], minlength=15)
    assert len(counts) == 15 and counts.min() > 0.85 * counts.float().mean()  # uniform over the 15
    size = levels.abs()
    assert float(size.max()) <= 1.0 and float(size.min()) >= 0.0
    assert float(size.mean()) == pytest.approx(0.8996, abs=0.002)  # N(0.9, 0.05) clipped at 1
    assert float((size == 1.0).float().mean()) == pytest.approx(0.0228, abs=0.004)  # P(N(0.9, 0.05) > 1)
    assert 0.47 < float((levels < 0).float().mean()) < 0.53  # negated half of the time
    fixed = AugmentParams.sample(
        dataclasses.replace(recipe, randaugment_std=0.0, randaugment_magnitude=4),
        100,
        (16, 16),
        (16, 16),
        torch.Generator().manual_seed(0),
    )
    assert torch.allclose(fixed.ra_levels.abs(), torch.tensor(0.4))
    off = AugmentParams.sample(PRESETS["crop_flip"], 10, (16, 16), (16, 16), torch.Generator().manual_seed(0))
    assert off.ra_ops is None and off.erase_boxes is None and off.crop_boxes is None


def test_pixel_operations():
    x = _x()
    torch.testing.assert_close(_op("Invert", x, 0.5), 1 - x)
    torch.testing.assert_close(_op("BrightnessIncreasing", x, -1.0), x * 0.1, rtol=0, atol=1e-6)
    assert torch.equal(_op("PosterizeIncreasing", x, 1.0), torch.zeros_like(x))  # 0 bits kept at m10
    kept3 = (_op("PosterizeIncreasing", x, 0.25) * 255).round()  # 3 bits: multiples of 32
    assert torch.equal(kept3 % 32, torch.zeros_like(kept3)) and torch.equal(kept3, (x * 255).round() // 32 * 32)
    torch.testing.assert_close(_op("SolarizeIncreasing", x, 1.0), 1 - x, rtol=0, atol=1e-6)  # threshold 0
    torch.testing.assert_close(_op("SolarizeIncreasing", x, 0.0), x, rtol=0, atol=1e-6)  # threshold 256
    added = _op("SolarizeAdd", x, 1.0) * 255
    values = (x * 255).round()
    expected = torch.where(values < 128, (values + 110).clamp(max=255), values)
    torch.testing.assert_close(added, expected, rtol=0, atol=1e-4)
    narrow = 0.3 + 0.2 * x
    stretched = _op("AutoContrast", narrow, 0.0)
    assert torch.allclose(stretched.amin(dim=(2, 3)), torch.tensor(0.0)) and torch.allclose(
        stretched.amax(dim=(2, 3)), torch.tensor(1.0)
    )
    equalized = _op("Equalize", narrow, 0.0)
    assert float(equalized.std()) > 2 * float(narrow.std())  # the histogram spread out
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        torch.testing.assert_close(_op(name, x, 0.0), x, rtol=0, atol=1e-5)  # factor 1: unchanged
        assert not torch.allclose(_op(name, x, 0.8), x)


def test_geometric_operations():
    x = _x(size=40)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        torch.testing.assert_close(_op(name, x, 0.0), x, rtol=0, atol=1e-5)  # magnitude 0: unchanged
    shifted = _op("TranslateXRel", x, 0.5)  # 0.45 * 40 * 0.5 = 9 pixels
    torch.testing.assert_close(shifted[..., :, :31], x[..., :, 9:], rtol=0, atol=1e-5)
    assert torch.allclose(shifted[..., :, 31:], FILL[None, :, None, None].expand(2, 3, 40, 9))
    down = _op("TranslateYRel", x, -0.5)
    torch.testing.assert_close(down[..., 9:, :], x[..., :31, :], rtol=0, atol=1e-5)
    centre = torch.zeros(1, 3, 41, 41)
    centre[..., 20, 20:] = 1.0  # a ray from the centre to the right
    turned = _op("Rotate", centre, 1.0)  # 30 degrees
    ys, xs = torch.nonzero(turned[0, 0] > 0.5, as_tuple=True)
    angles = torch.rad2deg(torch.atan2(-(ys.float() - 20), xs.float() - 20))[xs > 25]
    assert float(angles.abs().mean()) == pytest.approx(30, abs=3)


def test_grouped_application_equals_one_sample_at_a_time():
    n = 24
    x = _x(n=n, size=12, seed=3)
    recipe = dataclasses.replace(PRESETS["deit"], randaugment_ops=3, randaugment_prob=0.7)
    params = AugmentParams.sample(recipe, n, (12, 12), (12, 12), torch.Generator().manual_seed(1))
    out = rand_augment(x, params.ra_ops, params.ra_levels, FILL)
    for i in range(n):
        single = x[i : i + 1]
        for layer in range(3):
            op = int(params.ra_ops[i, layer])
            if op >= 0:
                single = list(OPS.values())[op](single, params.ra_levels[i : i + 1, layer], FILL)
        torch.testing.assert_close(out[i : i + 1], single, rtol=0, atol=1e-5)
    assert torch.equal(x, _x(n=n, size=12, seed=3))  # the input is left as it was
