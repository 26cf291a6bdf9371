"""RandAugment (timm's `rand-mM-mstdS-inc1`, DeiT's policy) on batches with per-sample operations.

Each image draws its own operations and magnitudes (distvit.augment.params); the images that drew the
same operation in a layer are gathered and transformed together, so a layer costs about one pass over
the batch whatever the mix. Operations act on float N x C x H x W in [0, 1]; pixel-level ones
(posterize, solarize) on the values rounded to 8 bits, as PIL's do. kornia supplies the per-sample
kernels (equalize, sharpness, PIL-style blends, affine warps); the few one-line ops are plain torch.
`level` is the signed magnitude / 10 in [-1, 1]: geometric and blend operations use its sign (timm
negates half of them), the others its size.
"""

from __future__ import annotations

import torch

from distvit.data.devices import to_device


def _autocontrast(x, level, fill):
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-8), x)


def _equalize(x, level, fill):
    from kornia.enhance import equalize

    return equalize(x)


def _invert(x, level, fill):
    return 1 - x


def _posterize(x, level, fill):
    bits = 4 - (level.abs() * 4).long()  # timm's PosterizeIncreasing: 4 bits kept at m0, 0 at m10
    mask = (0xFF << (8 - bits)) & 0xFF
    return (_bytes(x) & mask[:, None, None, None]).float() / 255


def _solarize(x, level, fill):
    threshold = 256 - (level.abs() * 256).long()  # SolarizeIncreasing: nothing at m0, everything at m10
    values = _bytes(x)
    return torch.where(values >= threshold[:, None, None, None], 255 - values, values).float() / 255


def _solarize_add(x, level, fill):
    add = (level.abs() * 110).long()
    values = _bytes(x)
    return torch.where(values < 128, (values + add[:, None, None, None]).clamp(max=255), values).float() / 255


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round_().long()


def _factor(level: torch.Tensor) -> torch.Tensor:
    return 1 + level * 0.9  # the *Increasing blends: 0.1 .. 1.9


def _color(x, level, fill):
    from kornia.enhance import adjust_saturation_with_gray_subtraction

    return adjust_saturation_with_gray_subtraction(x, _factor(level))


def _contrast(x, level, fill):
    from kornia.enhance import adjust_contrast_with_mean_subtraction

    return adjust_contrast_with_mean_subtraction(x, _factor(level))


def _brightness(x, level, fill):
    return (x * _factor(level)[:, None, None, None]).clamp(0, 1)


def _sharpness(x, level, fill):
    from kornia.enhance import sharpness

    return sharpness(x, _factor(level).clamp(min=0))


def _warp(x, matrices, fill):
    from kornia.geometry.transform import warp_affine

    height, width = x.shape[-2:]
    return warp_affine(x, matrices, (height, width), padding_mode="fill", fill_value=fill, align_corners=False)


def _affine(level: torch.Tensor, row0: tuple, row1: tuple) -> torch.Tensor:
    """N x 2 x 3 matrices from per-row coefficient functions of the level."""
    rows = [torch.stack([f(level) for f in row], dim=1) for row in (row0, row1)]
    return torch.stack(rows, dim=1)


def _rotate(x, level, fill):
    from kornia.geometry.transform import get_rotation_matrix2d

    height, width = x.shape[-2:]
    # from `level` (on the device): a tensor built from Python numbers on a GPU would be a synchronising copy
    center = torch.stack([torch.full_like(level, (width - 1) / 2), torch.full_like(level, (height - 1) / 2)], dim=1)
    return _warp(x, get_rotation_matrix2d(center, level * 30.0, torch.ones_like(center)), fill)


def _shear_x(x, level, fill):
    one, zero = torch.ones_like, torch.zeros_like
    return _warp(x, _affine(level * 0.3, (one, lambda s: -s, zero), (zero, one, zero)), fill)


def _shear_y(x, level, fill):
    one, zero = torch.ones_like, torch.zeros_like
    return _warp(x, _affine(level * 0.3, (one, zero, zero), (lambda s: -s, one, zero)), fill)


def _translate_x(x, level, fill):
    one, zero = torch.ones_like, torch.zeros_like
    shift = level * 0.45 * x.shape[-1]
    return _warp(x, _affine(shift, (one, zero, lambda t: -t), (zero, one, zero)), fill)


def _translate_y(x, level, fill):
    one, zero = torch.ones_like, torch.zeros_like
    shift = level * 0.45 * x.shape[-2]
    return _warp(x, _affine(shift, (one, zero, zero), (zero, one, lambda t: -t)), fill)


OPS = {  # timm's _RAND_INCREASING_TRANSFORMS, in its order
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color,
    "ContrastIncreasing": _contrast,
    "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
OP_NAMES = list(OPS)


def rand_augment(x: torch.Tensor, ops: torch.Tensor, levels: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Apply each sample's operations, layer by layer. `ops` (N x L, -1: skipped) and `levels` (N x L)
    are CPU tensors: grouping the samples needs no device synchronisation. `fill`: the C values that
    geometric operations bring in (the mean image colour, as timm)."""
    functions = list(OPS.values())
    x = x.clone(memory_format=torch.contiguous_format)  # written in place below, group by group
    for layer in range(ops.shape[1]):
        for op in torch.unique(ops[:, layer]).tolist():
            if op < 0:
                continue
            chosen = torch.nonzero(ops[:, layer] == op)[:, 0]
            index = to_device(chosen, x.device)
            level = to_device(levels[chosen, layer], x.device)
            x.index_copy_(0, index, functions[op](x.index_select(0, index), level, fill).to(x.dtype))
    return x
