"""distvit.augment.transforms: uint8 N x H x W x C in, normalised float N x C x S x S out (augmentation:
tests/unit/augment)."""

from __future__ import annotations

import pytest
import torch

from distvit.augment.transforms import BatchTransform

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
