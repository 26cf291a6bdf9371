"""Decoded images as uint8 H x W x 3 arrays: any PIL image to RGB, and the resize + centre crop that
the image-folder import, the stream reader and `distvit predict` share."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 H x W x 3, orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        top = array.max(initial=0)
        # 16-bit and wide ints scale from 65535, float images in [0, 1] from 1, anything else from 255
        peak = (
            65535.0
            if image.mode.startswith("I;16") or top > 255
            else (1.0 if image.mode == "F" and top <= 1 else 255.0)
        )
        gray = np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def resize_and_crop(array: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), then the centre `size` x `size`."""
    height, width = array.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = Image.fromarray(array)
    if new_h * new_w > 4 * size * size:
        # A long thin image (300000 x 1 px at size 32) would be resized whole to gigabytes before the crop:
        # resample only the source region the crop keeps (the same pixels within a level or two).
        sy, sx = new_h / height, new_w / width
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        return np.array(image.resize((size, size), Image.Resampling.BICUBIC, box=box))
    resized = np.array(image.resize((new_w, new_h), Image.Resampling.BICUBIC))  # writable copy
    return resized[top : top + size, left : left + size]
