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
