"""distvit.augment.ops and the Augmenter: each part does what it says on synthetic images; the crop_flip
preset draws and applies exactly what distvit did before augmentation had parts; a rank's slice of a
global batch is augmented as in the whole batch."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from distvit.augment import PRESETS, Augmenter, AugmentParams
from distvit.augment.ops import color_jitter, hflip, random_crop, random_erase, resized_crop
from distvit.augment.params import ERASE_AREA, ERASE_RATIO
from distvit.augment.transforms import BatchTransform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PLAIN = BatchTransform((8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _images(n: int = 4, size: int = 8, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=generator)


def test_hflip_mirrors_only_the_selected_images():
    images = _images(n=3)
    out = hflip(images, torch.tensor([True, False, True]))
    assert torch.equal(out[1], images[1])
    for i in (0, 2):
        assert not torch.equal(out[i], images[i])
        for col in range(8):
            assert torch.equal(out[i, :, col], images[i, :, 7 - col])


def test_random_crop_shifts_each_image_by_its_offset_with_zero_fill():
    images = _images(n=3)
    out = random_crop(images, 2, torch.tensor([[2, 2], [0, 4], [4, 1]]))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[0], images[0])  # offset == padding: the original image
    # offset (0, 4): two zero rows on top, content moved down by 2 and left by 2
    assert torch.equal(out[1, :2], torch.zeros(2, 8, 3, dtype=torch.uint8))
    assert torch.equal(out[1, 2:, :6], images[1, :6, 2:])
    assert torch.equal(out[1, :, 6:], torch.zeros(8, 2, 3, dtype=torch.uint8))
    # offset (4, 1): moved up by 2 and right by 1
    assert torch.equal(out[2, :6, 1:], images[2, 2:, :7])
    assert out[2, 6:].eq(0).all() and out[2, :, 0].eq(0).all()
    assert random_crop(images, 0, torch.full((3, 2), 5)) is images


def test_crop_flip_preset_is_what_distvit_drew_and_applied_before_parts():
    """Existing configs (augment.preset=crop_flip) must train on the same images as before: offsets from
    randint(0, 2p + 1, (2, N)), then flips from rand(N) < 0.5, crop then flip, then resize + normalise."""
    images = _images(n=16, size=12)
    transform = BatchTransform((24, 24), MEAN, STD)
    recipe = dataclasses.replace(PRESETS["crop_flip"], crop_padding=3)
    augment = Augmenter(recipe, transform)
    out = augment(images, augment.sample(16, (12, 12), torch.Generator().manual_seed(11)))
    generator = torch.Generator().manual_seed(11)
    offsets = torch.randint(0, 7, (2, 16), generator=generator)
    flips = torch.rand(16, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (0, 0, 3, 3, 3, 3))
    before = torch.stack(
        [padded[i, offsets[0, i] : offsets[0, i] + 12, offsets[1, i] : offsets[1, i] + 12] for i in range(16)]
    )
    before = torch.where(flips[:, None, None, None], before.flip(2), before)
    assert torch.equal(out, transform(before))


def test_a_ranks_slice_is_augmented_as_in_the_whole_batch():
    """Every part on: two ranks' halves of a global batch equal one rank's whole batch, bit for bit."""
    recipe = dataclasses.replace(PRESETS["deit"], color_jitter=0.4, color_jitter_prob=0.8, randaugment_prob=1.0)
    augment = Augmenter(recipe, BatchTransform((16, 16), MEAN, STD))
    images = _images(n=12, size=16, seed=5)
    params = augment.sample(12, (16, 16), torch.Generator().manual_seed(2))
    whole = augment(images, params)
    halves = torch.cat([augment(images[:5], params.slice(0, 5)), augment(images[5:], params.slice(5, 12))])
    assert torch.equal(whole, halves)
    assert torch.equal(params.slice(5, 12).ra_ops, params.ra_ops[5:])
    again = augment(images, augment.sample(12, (16, 16), torch.Generator().manual_seed(2)))
    other = augment(images, augment.sample(12, (16, 16), torch.Generator().manual_seed(3)))
    assert torch.equal(whole, again) and not torch.equal(whole, other)


def test_resized_crop_takes_each_images_box_to_the_output_size():
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, :, :8] = 0.25  # left half
    x[:, :, :, 8:] = 0.75
    boxes = torch.tensor([[0, 0, 16, 8], [4, 8, 8, 8]])  # top, left, height, width
    out = resized_crop(x, boxes, (32, 32))
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out[0], torch.full((3, 32, 32), 0.25))
    torch.testing.assert_close(out[1], torch.full((3, 32, 32), 0.75))
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[2, 3, 10, 12], [0, 0, 20, 24], [5, 1, 7, 9]])
    out = resized_crop(images, boxes, (24, 24))
    for i, (top, left, height, width) in enumerate(boxes.tolist()):  # = cut out the box, then resize it
        box = images[i : i + 1, :, top : top + height, left : left + width]
        expected = torch.nn.functional.interpolate(box, size=(24, 24), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i : i + 1], expected, rtol=0, atol=1e-5)
    ramp = torch.arange(16.0).expand(1, 3, 16, 16) / 16
    whole = resized_crop(ramp, torch.tensor([[0, 0, 16, 16]]), (16, 16))
    torch.testing.assert_close(whole, ramp, rtol=0, atol=1e-5)  # the whole image at its size: itself


def test_colour_jitter_factors_scale_brightness_contrast_and_saturation():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    unchanged = color_jitter(x, torch.ones(3, 3))
    torch.testing.assert_close(unchanged, x, rtol=0, atol=1e-6)
    darker = color_jitter(x, torch.tensor([[0.5, 1.0, 1.0]] * 3))
    torch.testing.assert_close(darker, x * 0.5, rtol=0, atol=1e-6)
    grey = color_jitter(x, torch.tensor([[1.0, 1.0, 0.0]] * 3))  # saturation 0: every channel the same
    torch.testing.assert_close(grey[:, 0], grey[:, 2], rtol=0, atol=1e-6)
    flat = color_jitter(x, torch.tensor([[1.0, 0.0, 1.0]] * 3))  # contrast 0: the grey mean everywhere
    assert flat.flatten(1).std(dim=1).max() < 1e-6


def test_erasing_fills_exactly_its_boxes_with_standard_normal_noise():
    n, size = 4000, 32
    params = AugmentParams.sample(
        dataclasses.replace(PRESETS["none"], erasing=0.25),
        n,
        (size, size),
        (size, size),
        torch.Generator().manual_seed(0),
    )
    x = torch.full((n, 3, size, size), 7.0)  # no noise value is 7
    out = random_erase(x, params.erase_boxes, params.erase_noise)
    changed = out != 7.0
    boxes = params.erase_boxes
    assert int(changed.sum()) == int((boxes[:, 2] * boxes[:, 3]).sum()) * 3  # exactly the boxes, all channels
    for i in torch.nonzero(boxes[:, 2] > 0)[:5, 0].tolist():
        top, left, h, w = boxes[i].tolist()
        assert changed[i, :, top : top + h, left : left + w].all()
    noise = out[changed]
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02
    # the configured area on average: timm's algorithm simulated independently
    rng, fractions = random.Random(0), []
    for _ in range(20000):
        area = 0.0
        if rng.random() < 0.25:
            for _ in range(10):
                target = rng.uniform(*ERASE_AREA) * size * size
                ratio = math.exp(rng.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
                h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
                if h < size and w < size:
                    area = h * w / (size * size)
                    break
        fractions.append(area)
    expected = sum(fractions) / len(fractions)
    measured = float(changed[:, 0].float().mean())
    assert expected == pytest.approx(0.0436, abs=0.002)  # about 0.25 x 0.17 (the largest boxes fit less often)
    assert measured == pytest.approx(expected, rel=0.08)
    assert 0.23 < float((boxes[:, 2] > 0).float().mean()) < 0.27


def test_a_resized_crop_from_images_larger_than_the_model_input_does_not_alias():
    """Stored images larger than the model's input: a shrinking box averages (a pixel-fine pattern becomes
    its mean, where plain bilinear sampling would pick every fourth pixel), an enlarging one is bilinear."""
    dots = torch.zeros(1, 3, 64, 64)
    dots[..., ::2, ::2] = 1.0  # a quarter of the pixels lit
    shrunk = resized_crop(dots, torch.tensor([[0, 0, 64, 64]]), (16, 16))
    torch.testing.assert_close(shrunk, torch.full((1, 3, 16, 16), 0.25), rtol=0, atol=1e-6)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    boxes = [[0, 0, 10, 10], [4, 4, 20, 20]]
    out = resized_crop(images, torch.tensor(boxes), (20, 20))
    for i, (top, left, height, width) in enumerate(boxes):
        box = images[i : i + 1, :, top : top + height, left : left + width]
        expected = torch.nn.functional.interpolate(box, size=(20, 20), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i, :, 1:-1, 1:-1], expected[0, :, 1:-1, 1:-1], rtol=0, atol=1e-5)
