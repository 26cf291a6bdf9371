"""Batched image operations with one parameter per sample, on the training device.

uint8 N x H x W x C at stored size: the padded random crop and the flip (cheap on the small images).
float N x C x H x W in [0, 1]: the random-resized crop (one batched grid_sample over per-sample boxes),
colour jitter (kornia's PIL-style blends with per-sample factors). After normalisation: random erasing.
Per-sample parameters come as CPU tensors (distvit.augment.params) and travel with non-blocking copies.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from distvit.data.devices import to_device

NOISE_TILES = 8
"""Noise fields of the erasing bank; a sample's box takes its noise from one at a random offset."""


def random_crop(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad N x H x W x C images by `padding` and crop each back to H x W at its (top, left) offset."""
    if padding == 0:
        return images
    n, height, width, _ = images.shape
    device = images.device
    offsets = to_device(offsets, device)
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(height, device=device)
    cols = offsets[:, 1, None] + torch.arange(width, device=device)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the N x H x W x C images selected by the bool mask `flip` left-right."""
    return torch.where(to_device(flip, images.device)[:, None, None, None], images.flip(2), images)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each N x C x H x W image's (top, left, height, width) box, resampled to `size` in one batched call
    (kornia's crop_by_indices slices and resizes image by image in Python, a kernel launch per sample):
    bilinear with pixel centres aligned as a resize of the cut-out box would; where images are larger than
    `size`, torchvision's roi_align instead, which averages several samples per output pixel when a box
    shrinks (plain bilinear sampling would alias, as an un-antialiased resize does)."""
    height, width = x.shape[-2:]
    if height > size[0] or width > size[1]:
        from torchvision.ops import roi_align

        top, left, box_h, box_w = boxes.to(x.dtype).unbind(1)
        rois = torch.stack([torch.arange(len(boxes), dtype=x.dtype), left, top, left + box_w, top + box_h], dim=1)
        return roi_align(x, to_device(rois, x.device), list(size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    top, left, box_h, box_w = boxes.double().unbind(1)
    zero = torch.zeros_like(top)
    theta = torch.stack(  # output [-1, 1] -> the box's span of the input's [-1, 1]
        [
            torch.stack([box_w / width, zero, (2 * left + box_w) / width - 1], dim=1),
            torch.stack([zero, box_h / height, (2 * top + box_h) / height - 1], dim=1),
        ],
        dim=1,
    )
    # samples stay within the box's outer pixel centres, as when the box is cut out first, then resized
    low = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=1)
    high = torch.stack([(2 * (left + box_w) - 1) / width - 1, (2 * (top + box_h) - 1) / height - 1], dim=1)
    theta, low, high = (to_device(t.to(x.dtype), x.device) for t in (theta, low, high))
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
    grid = torch.maximum(torch.minimum(grid, high[:, None, None, :]), low[:, None, None, :])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation by the N x 3 per-sample factors (PIL's blends: with black, the
    grey mean, the grey image), in that order."""
    from kornia.enhance import adjust_contrast_with_mean_subtraction, adjust_saturation_with_gray_subtraction

    factors = to_device(factors, x.device)
    x = (x * factors[:, 0, None, None, None]).clamp_(0, 1)
    x = adjust_contrast_with_mean_subtraction(x, factors[:, 1])
    return adjust_saturation_with_gray_subtraction(x, factors[:, 2])


def random_erase(x: torch.Tensor, boxes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Fill each normalised N x C x H x W image's box (height 0: none) with standard normal noise (timm's
    'pixel' mode). The noise comes from a bank drawn once from a fixed seed on the CPU, each box from one
    of its fields at a random offset: the same on every device, and no per-pixel draw per step."""
    erased = torch.nonzero(boxes[:, 2] > 0)[:, 0]  # CPU tensors: no device synchronisation
    if not len(erased):
        return x
    n, channels, height, width = x.shape
    device = x.device
    top, left, box_h, box_w = (to_device(boxes[erased, i], device)[:, None, None] for i in range(4))
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    bank = _noise_bank(channels, height, width, device)
    tile, dy, dx = (to_device(noise[erased, i], device) for i in range(3))
    fill = bank[
        tile[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        (dy[:, None, None, None] + torch.arange(height, device=device)[None, None, :, None]),
        (dx[:, None, None, None] + torch.arange(width, device=device)[None, None, None, :]),
    ]
    index = to_device(erased, device)
    chosen = x.index_select(0, index)
    return x.index_copy(0, index, torch.where(inside[:, None], fill.to(x.dtype), chosen))


@functools.lru_cache(maxsize=4)
def _noise_bank(channels: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randn(NOISE_TILES, channels, 2 * height, 2 * width, generator=generator).to(device)
