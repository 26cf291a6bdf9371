"""distvit.data.images: decoding to 8-bit RGB (modes, EXIF orientation), resize and centre crop."""

from __future__ import annotations

import numpy as np
from PIL import Image

from distvit.data.images import resize_and_crop, to_rgb
from tests.support.images import rgb, save


def test_modes_become_8_bit_rgb():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque pixel keeps its colour, transparent ones become white
    out = to_rgb(Image.fromarray(rgba, "RGBA"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]

    sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16))
    assert to_rgb(sixteen)[..., 0].tolist() == [[0, 100], [255, 7]]

    gray = to_rgb(Image.fromarray(np.array([[5, 250]], dtype=np.uint8), "L"))
    assert gray.tolist() == [[[5, 5, 5], [250, 250, 250]]]

    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).tolist() == [[[255, 255, 255]]]

    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    assert to_rgb(palette).tolist() == [[[200, 0, 0], [0, 0, 200]]]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(rgb(10, 40))  # 40 wide, 10 high as stored
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(tmp_path / "r.jpg", image, exif=exif, quality=95)
    with Image.open(path) as opened:
        assert to_rgb(opened).shape == (40, 10, 3)


def test_resize_keeps_aspect_and_crops_centre():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 10:30] = 255  # centre half is white
    out = resize_and_crop(array, 10)
    assert out.shape == (10, 10, 3)
    # the centre 10x10 of the 10x20 resize is the white band (bicubic softens its outer columns a little)
    assert out[:, 1:-1].min() >= 250 and out.min() >= 200


def test_a_long_thin_image_is_cropped_without_resizing_all_of_it():
    """A 952-byte 300000 x 1 PNG used to be resized whole (to 9.6M x 32 px, gigabytes) before the crop.
    Measured in a fresh process: its peak memory stays within 200 MB of what importing the module takes."""
    import subprocess
    import sys

    from tests.support.helpers import REPO, subprocess_env

    script = """
import resource, numpy as np
from distvit.data.images import resize_and_crop
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
thin = np.zeros((1, 300_000, 3), dtype=np.uint8)
thin[0, 150_000 - 5 : 150_000 + 5] = 255
out = resize_and_crop(thin, 32)
assert out.shape == (32, 32, 3) and out.dtype == np.uint8, out.shape
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, int(out.min()))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    growth_kb, darkest = map(int, result.stdout.split())
    assert growth_kb < 200 * 1024, growth_kb
    assert darkest >= 200  # the crop keeps the centre source pixel, which is bright


def test_ordinary_aspect_ratios_keep_the_full_resize():
    """Up to 4x the output's pixels the whole image is resized, then cropped (the stored pixels of every
    earlier import stay the same); beyond, only the kept region is resampled, within two levels."""
    generator = np.random.default_rng(0)
    wide = generator.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    full = np.array(Image.fromarray(wide).resize((46, 32), Image.Resampling.BICUBIC))[:, 7:39]  # 47 * 32 / 33
    assert np.array_equal(resize_and_crop(wide, 32), full)
    long = generator.integers(0, 256, (30, 500, 3), dtype=np.uint8)
    whole = np.array(Image.fromarray(long).resize((533, 32), Image.Resampling.BICUBIC))[:, 250:282]
    assert np.abs(resize_and_crop(long, 32).astype(int) - whole.astype(int)).max() <= 2
