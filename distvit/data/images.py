"""Decoded images as uint8 H x W x 3 arrays: any PIL image to RGB, and the resize + centre crop that
the image-folder import, the stream reader and `distvit predict` share."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps

from distvit.errors import DataError


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


DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombWarning,
    Image.DecompressionBombError,
)
"""What Pillow raises for a file that is not a decodable image (or one over its pixel limit)."""


@contextlib.contextmanager
def open_image(source) -> Iterator[Image.Image]:
    """Image.open with Pillow's decompression-bomb warning (over MAX_IMAGE_PIXELS) raised as an error:
    no image over the limit is decoded. Catch DECODE_ERRORS around it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            yield image


def decode_stored(payload: bytes, channels: int, expected: tuple[int, int] | None, where: str) -> np.ndarray:
    """A dataset sample's image -> uint8 H x W x C (a writable copy). Its size is read from the header and
    checked against the manifest's before anything is decoded (a decompression bomb never unpacks); every
    problem is one DataError naming the sample."""
    if channels == 3 and (size := jpeg_size(payload)) is not None:  # the common case of JPEG shards, fast
        _check_size(size, expected, where)
        try:
            return decode_jpeg_bytes(payload)
        except RuntimeError as err:
            raise undecodable(where, err) from None
    try:
        with open_image(io.BytesIO(payload)) as image:
            if expected is not None:
                _check_size(image.size, expected, where)
            array = np.array(image.convert("RGB" if channels == 3 else "L"))
    except DECODE_ERRORS as err:
        raise undecodable(where, err) from None
    return array if array.ndim == 3 else array[..., None]


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


def decode_jpeg_bytes(payload: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 H x W x 3 with libjpeg-turbo through torch (no PIL image in between: ~1.4x
    Pillow's rate here). Raises RuntimeError on a damaged body."""
    import torch

    data = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())
    return decode_jpeg(data).permute(1, 2, 0).numpy()


def decode_jpeg(data, device="cpu"):
    """RGB decoding of a JPEG byte tensor (or a list of them, in one call: on a GPU nvJPEG decodes the
    batch) to C x H x W uint8. TorchCodec's decoder where installed; torchvision's (deprecated since 0.29
    in its favour, bit-identical output) otherwise, e.g. on machines that only have torchvision."""
    try:
        from torchcodec.decoders import decode_jpeg as decoder
    except (ImportError, OSError, RuntimeError):  # not installed, or its native library does not load here
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_decoder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torchvision_decoder(data, mode=ImageReadMode.RGB, device=device)
    return decoder(data, mode="RGB", device=device)


def checked_jpeg(payload: bytes, expected: tuple[int, int] | None, where: str) -> bytes:
    """A stored sample's bytes for decoding elsewhere (on the training device): a JPEG whose header says
    the manifest's size, else a DataError naming the sample. Nothing is decoded here."""
    size = jpeg_size(payload)
    if size is None:  # not a JPEG, or one whose frame header is not where prepare puts it: ask Pillow
        try:
            with open_image(io.BytesIO(payload)) as image:
                size, kind = image.size, image.format
        except DECODE_ERRORS as err:
            raise undecodable(where, err) from None
        if kind != "JPEG":
            raise DataError(f"{where} is {kind}, not JPEG: decoding on the device needs JPEG shards (data.decode).")
    _check_size(size, expected, where)
    return payload


def undecodable(where: str, err: Exception) -> DataError:
    """The one message for a stored image that does not decode."""
    reason = (str(err).splitlines() or [""])[0]
    return DataError(f"{where}: image cannot be decoded ({type(err).__name__}: {reason}). Prepare the dataset again.")


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read by walking its marker segments (a few microseconds,
    ~10x less than Pillow's open); None when `payload` is not a JPEG whose frame header comes first."""
    if payload[:3] != b"\xff\xd8\xff":
        return None
    position = 2
    while position + 9 <= len(payload):
        if payload[position] != 0xFF:
            return None
        marker = payload[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _SOF_MARKERS:
            height = int.from_bytes(payload[position + 5 : position + 7], "big")
            width = int.from_bytes(payload[position + 7 : position + 9], "big")
            return (width, height) if width and height else None
        if marker == 0xDA:  # scan data before a frame header: not what prepare writes
            return None
        position += 2 + int.from_bytes(payload[position + 2 : position + 4], "big")
    return None


def _check_size(size: tuple[int, int], expected: tuple[int, int] | None, where: str) -> None:
    """The header's (width, height) against the manifest's (height, width), and Pillow's pixel limit."""
    width, height = size
    if expected is not None and size != (expected[1], expected[0]):
        raise DataError(
            f"{where} is {width} x {height} px, the manifest says {expected[1]} x {expected[0]}. "
            "Prepare the dataset again."
        )
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise DataError(
            f"{where} is {width} x {height} px, over the {Image.MAX_IMAGE_PIXELS} pixels any image may have. "
            "Prepare the dataset again."
        )
