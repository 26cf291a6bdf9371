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
    checked against the manifest's before anything is decoded (a decompression bomb never unpacks); a JPEG
    whose data ends early is refused, not filled grey; every problem is one DataError naming the sample."""
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
            if image.format == "JPEG":  # Pillow, too, fills what a JPEG's data lacks with grey, silently
                refuse_incomplete_jpeg(payload, np.atleast_1d(array[-1, -1]).tolist())
    except (*DECODE_ERRORS, IncompleteJpeg) as err:
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
    Pillow's rate here). Raises RuntimeError on a damaged body (IncompleteJpeg where its data ends early)."""
    import torch

    _check_jpeg_end(payload)
    data = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())
    return decode_jpeg(data).permute(1, 2, 0).numpy()


def decode_jpeg(data, device="cpu"):
    """RGB decoding of a JPEG byte tensor (or a list of them, in one call: on a GPU nvJPEG decodes the
    batch) to C x H x W uint8. TorchCodec's decoder where installed; torchvision's (deprecated since 0.29
    in its favour, bit-identical output) otherwise, e.g. on machines that only have torchvision. Raises
    RuntimeError for a damaged JPEG: IncompleteJpeg for one whose data ends before its frame does."""
    try:
        from torchcodec.decoders import decode_jpeg as decoder
    except (ImportError, OSError, RuntimeError):  # not installed, or its native library does not load here
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_decoder

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = torchvision_decoder(data, mode=ImageReadMode.RGB, device=device)
    else:
        decoded = decoder(data, mode="RGB", device=device)
    if isinstance(decoded, list):
        _refuse_incomplete_batch(data, decoded)
    else:
        refuse_incomplete_jpeg(data, decoded[:, -1, -1].tolist())
    return decoded


class IncompleteJpeg(RuntimeError):
    """A JPEG whose entropy-coded data ends before its frame (header) does: cut short, or a header that
    claims more rows than the data holds. libjpeg (under TorchCodec, torchvision and Pillow) only warns
    on stderr and fills the missing blocks grey; nvJPEG is not known to do better. Caught wherever the
    image's last block is among the missing ones: a progressive JPEG cut in a later scan decodes whole
    but blurred, and is not."""


FILL_VALUE = 128
"""What libjpeg decodes every pixel of the blocks after the end of short data to: their coefficients
stay zero, which is mid-grey in every channel."""

_PROBE = b"\x55" * 64
"""Bytes put where each scan's data ends to test whether the decoder reads them as image data (no 0xFF,
so no marker; not zeros, which are what libjpeg itself fills short data with)."""


def refuse_incomplete_jpeg(payload, corner: list) -> None:
    """Raise IncompleteJpeg when the JPEG `payload` (bytes or a byte tensor), whose decoded bottom-right
    pixel is `corner`, ended early. Its last block is the first to go grey when data is missing, so a
    pixel other than mid-grey there (nearly every image) settles it in a microsecond; a mid-grey one is
    checked exactly (`ends_early`, about two Pillow decodes)."""
    if all(value == FILL_VALUE for value in corner):
        _refuse_if_ends_early(payload)


def _refuse_if_ends_early(payload) -> None:
    raw = payload if isinstance(payload, bytes) else payload.cpu().numpy().tobytes()
    if ends_early(raw):
        raise IncompleteJpeg(
            "its data ends before the image does: the file was cut short, or its header claims more rows than "
            "its data holds; decoders fill the rest grey"
        )


def _refuse_incomplete_batch(payloads: list, decoded: list) -> None:
    """`refuse_incomplete_jpeg` for a batch decoded in one call: the bottom-right pixels are gathered on
    the device and compared there, one small copy to the host for the batch."""
    import torch

    if not decoded:
        return
    corners = torch.stack([image[:, -1, -1] for image in decoded])  # views: one gather kernel
    for index in (corners == FILL_VALUE).all(dim=1).nonzero().flatten().tolist():
        _refuse_if_ends_early(payloads[index])


def ends_early(payload: bytes) -> bool:
    """Whether a JPEG's entropy-coded data ends before its frame is complete. Exact where it answers True:
    bytes inserted where each scan's data ends are skipped by the decoder on its way to the next marker
    when the scan is complete (the same pixels), but read as image data when it is not (other pixels, or
    an error). False where there is no scan to test or Pillow cannot decode the original."""
    ends = _scan_ends(payload)
    if not ends:
        return False
    pieces, start = [], 0
    for end in ends:
        pieces += [payload[start:end], _PROBE]
        start = end
    probed = b"".join(pieces) + payload[start:]
    try:
        original = _pillow_pixels(payload)
    except DECODE_ERRORS:
        return False
    try:
        return not np.array_equal(original, _pillow_pixels(probed))
    except DECODE_ERRORS:
        return True


def _pillow_pixels(payload: bytes) -> np.ndarray:
    """Pillow's decoding (it keeps libjpeg's warnings off stderr, unlike the torch decoders)."""
    with open_image(io.BytesIO(payload)) as image:
        return np.asarray(image.convert("RGB"))


def _scan_ends(payload: bytes) -> list[int]:
    """Offsets of the markers that end each scan's entropy-coded data (before any fill bytes), found by
    walking the marker segments and, inside a scan, past stuffed bytes (FF 00) and restart markers."""
    ends, position, size = [], 2, len(payload)
    while position + 4 <= size and payload[position] == 0xFF:
        marker = payload[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # end of image
            break
        position += 2 + int.from_bytes(payload[position + 2 : position + 4], "big")
        if marker != 0xDA:  # a segment other than a scan header: no entropy-coded data follows
            continue
        while True:
            position = payload.find(b"\xff", position)
            if position < 0 or position + 1 >= size:
                return ends
            following = position + 1
            while following < size and payload[following] == 0xFF:
                following += 1
            if following < size and (payload[following] == 0 or 0xD0 <= payload[following] <= 0xD7):
                position = following + 1  # a stuffed 0xFF byte or a restart marker: still this scan
                continue
            ends.append(position)
            break
    return ends


def _check_jpeg_end(payload: bytes) -> None:
    """IncompleteJpeg when a JPEG holds no end-of-image marker after its first scan header: cut short.
    (The CPU decoders raise for that too, with a message naming their source files; nvJPEG may not.)"""
    if payload.endswith(b"\xff\xd9"):  # nearly always, and tested in well under a microsecond
        return
    scan = _first_scan(payload)
    if scan is not None and payload.find(b"\xff\xd9", scan) < 0:
        raise IncompleteJpeg("it ends without its end-of-image marker: the file was cut short")


def _first_scan(payload: bytes) -> int | None:
    """Offset of the first scan header (SOS) found by walking the marker segments; None if there is none."""
    position = 2
    while position + 4 <= len(payload) and payload[position] == 0xFF:
        marker = payload[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == 0xDA:
            return position
        position += 2 + int.from_bytes(payload[position + 2 : position + 4], "big")
    return None


def checked_jpeg(payload: bytes, expected: tuple[int, int] | None, where: str) -> bytes:
    """A stored sample's bytes for decoding elsewhere (on the training device): a JPEG whose header says
    the manifest's size and that is not cut short, else a DataError naming the sample. Nothing is decoded
    here."""
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
    try:
        _check_jpeg_end(payload)  # data that ends early inside the frame: decode_jpeg, after decoding
    except IncompleteJpeg as err:
        raise undecodable(where, err) from None
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
