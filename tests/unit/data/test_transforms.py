"""distvit.data.transforms: uint8 N x H x W x C in, normalised float N x C x S x S out; the random crop and
flip of a seeded Augmentation, and a rank's slice of it."""

from __future__ import annotations

import pytest
import torch

from distvit.data.transforms import Augmentation, BatchTransform, hflip, random_crop

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _images(n: int = 4, size: int = 8, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=generator)


def _normalised(values: torch.Tensor, channel: int) -> torch.Tensor:
    """(v / 255 - mean) / std in float32, the formula written out for one channel."""
    return (values.float() / 255.0 - torch.tensor(MEAN[channel])) / torch.tensor(STD[channel])


def test_constant_image_is_normalised_per_channel():
    images = torch.empty(2, 32, 32, 3, dtype=torch.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 10, 128, 250
    out = BatchTransform((32, 32), MEAN, STD)(images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    for channel, value in enumerate((10, 128, 250)):
        expected = _normalised(torch.tensor(value), channel)
        assert torch.equal(out[:, channel], expected.expand(2, 32, 32))
    assert out[0, 0, 0, 0].item() == pytest.approx((10 / 255 - 0.485) / 0.229, rel=1e-6)


def test_pixels_keep_their_place_and_channel_at_stored_size():
    images = _images(n=3, size=6)
    out = BatchTransform((6, 6), MEAN, STD)(images)
    for channel in range(3):
        torch.testing.assert_close(out[:, channel], _normalised(images[..., channel], channel), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [64, 16])
def test_resize_to_the_model_input_size(size):
    images = torch.full((2, 32, 32, 3), 200, dtype=torch.uint8)
    out = BatchTransform((size, size), MEAN, STD)(images)
    assert out.shape == (2, 3, size, size)
    for channel in range(3):  # a constant image stays constant under bilinear (antialiased) resizing
        torch.testing.assert_close(out[:, channel], _normalised(torch.tensor(200), channel).expand(2, size, size))


def test_shrinking_is_antialiased():
    dots = torch.zeros(1, 32, 32, 1, dtype=torch.uint8)
    dots[:, ::4, ::4] = 255  # one lit pixel per 4 x 4 block: plain bilinear sampling would miss them all
    shrunk = BatchTransform((8, 8), (0.0,), (1.0,))(dots)
    assert shrunk.shape == (1, 1, 8, 8)  # one channel and one-channel statistics: not expanded
    torch.testing.assert_close(shrunk[0, 0, 1:-1, 1:-1], torch.full((6, 6), 1 / 16), rtol=0, atol=1e-6)


def test_grey_images_are_expanded_to_three_channels():
    images = torch.full((2, 8, 8, 1), 51, dtype=torch.uint8)
    out = BatchTransform((8, 8), MEAN, STD)(images)
    assert out.shape == (2, 3, 8, 8)
    for channel in range(3):
        assert torch.equal(out[:, channel], _normalised(torch.tensor(51), channel).expand(2, 8, 8))


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
    out = random_crop(images, 2, torch.tensor([2, 0, 4]), torch.tensor([2, 4, 1]))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[0], images[0])  # offset == padding: the original image
    # offset (0, 4): two zero rows on top, content moved down by 2 and left by 2
    assert torch.equal(out[1, :2], torch.zeros(2, 8, 3, dtype=torch.uint8))
    assert torch.equal(out[1, 2:, :6], images[1, :6, 2:])
    assert torch.equal(out[1, :, 6:], torch.zeros(8, 2, 3, dtype=torch.uint8))
    # offset (4, 1): moved up by 2 and right by 1
    assert torch.equal(out[2, :6, 1:], images[2, 2:, :7])
    assert out[2, 6:].eq(0).all() and out[2, :, 0].eq(0).all()
    assert random_crop(images, 0, torch.tensor([5, 5, 5]), torch.tensor([5, 5, 5])) is images


def test_sampled_augmentation_is_reproducible_from_the_seed():
    first = Augmentation.sample(1000, 4, True, torch.Generator().manual_seed(3))
    again = Augmentation.sample(1000, 4, True, torch.Generator().manual_seed(3))
    other = Augmentation.sample(1000, 4, True, torch.Generator().manual_seed(4))
    for name in ("offset_y", "offset_x", "flip"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.offset_y, other.offset_y)
    assert first.padding == 4 and first.offset_y.shape == first.flip.shape == (1000,)
    for offsets in (first.offset_y, first.offset_x):  # every offset in [0, 2 * padding] occurs, nothing else
        assert offsets.unique().tolist() == list(range(9))
    assert 400 < int(first.flip.sum()) < 600  # a fair coin per image
    assert not torch.equal(first.offset_y, first.offset_x)
    no_flip = Augmentation.sample(1000, 4, False, torch.Generator().manual_seed(3))
    assert not no_flip.flip.any() and torch.equal(no_flip.offset_x, first.offset_x)


def test_slice_selects_the_ranks_rows_and_transforms_agree_across_splits():
    augmentation = Augmentation.sample(6, 2, True, torch.Generator().manual_seed(0))
    rank1 = augmentation.slice(3, 6)
    assert rank1.padding == 2
    assert torch.equal(rank1.offset_y, augmentation.offset_y[3:6])
    assert torch.equal(rank1.offset_x, augmentation.offset_x[3:6])
    assert torch.equal(rank1.flip, augmentation.flip[3:6])
    images = _images(n=6)
    transform = BatchTransform((8, 8), MEAN, STD)
    whole = transform(images, augmentation)
    halves = torch.cat([transform(images[:3], augmentation.slice(0, 3)), transform(images[3:], rank1)])
    assert torch.equal(whole, halves)


def test_transform_crops_then_flips():
    images = _images(n=2)
    augmentation = Augmentation(2, torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([True, False]))
    out = BatchTransform((8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(images, augmentation)
    cropped = random_crop(images, 2, augmentation.offset_y, augmentation.offset_x)
    expected = torch.stack([cropped[0].flip(1), cropped[1]]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(out, expected)
