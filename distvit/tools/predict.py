"""Class predictions for image files, from a distvit checkpoint or from a pretrained timm model.

    predict_checkpoint(run_dir_or_checkpoint, ["cat.png", ...], top_k=5, weights="model" | "ema")
    predict_pretrained("deit_tiny_patch16_224", ["capybara.jpg"], pretrained=True | "weights.pth")

A checkpoint's images are preprocessed exactly as at training: decoded to 8-bit RGB (`to_rgb`, as
`distvit prepare imagefolder` does), brought to the size the dataset stored its images at
(`resize_and_crop`, shorter side then centre crop; the model's input size when the dataset kept original
sizes, as the streaming loader does), then the training `BatchTransform` (resize to the model's input
size, normalisation with the model's mean/std) without augmentation.

A pretrained model (the lesson's "is this a capybara?" check) uses timm's own eval transform for its
data config, and ImageNet class descriptions when its head has ImageNet's classes.

Images are decoded and run a batch at a time, so memory is bounded whatever the number of files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.data
import torch
from PIL import Image

from distvit.augment.transforms import BatchTransform
from distvit.data.images import DECODE_ERRORS, open_image, resize_and_crop, to_rgb
from distvit.errors import DistvitError
from distvit.run.checkpoint_files import load_model

BATCH_SIZE = 64


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, int, float]]
    """(class name, class index, probability), most probable first."""


# -- images ---------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> np.ndarray:
    """One image file -> uint8 H x W x 3 (EXIF orientation applied, any mode converted to RGB)."""
    path = Path(path)
    if not path.exists():
        raise DistvitError(f"image {path} does not exist.")
    if not path.is_file():
        raise DistvitError(f"image {path} is not a file.")
    try:
        with open_image(path) as image:
            image.seek(0)
            return np.array(to_rgb(image))  # a writable copy, independent of the file
    except DECODE_ERRORS as err:
        raise DistvitError(f"image {path} cannot be decoded ({type(err).__name__}: {err}).") from None


def load_images(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Image files -> uint8 H x W x 3 arrays; a missing or undecodable file is a DistvitError naming it."""
    return [load_image(path) for path in paths]


def _check_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Fail before any work when a file is missing (decoding errors surface batch by batch)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise DistvitError("no image files given.")
    for path in paths:
        if not Path(path).is_file():
            raise DistvitError(f"image {path} {'is not a file' if Path(path).exists() else 'does not exist'}.")
    return paths


def _batches(paths: list[str], batch_size: int) -> Iterator[list[str]]:
    for start in range(0, len(paths), batch_size):
        yield paths[start : start + batch_size]


def fit_to_size(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`array` at the stored size (H, W): unchanged when already there, else shorter side then centre
    crop, as `distvit prepare imagefolder --image-size` does (distvit's stored sizes are square)."""
    return array if array.shape[:2] == tuple(size) else resize_and_crop(array, int(size[0]))


# -- shared ---------------------------------------------------------------------------------------------


def _check_top_k(top_k: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise DistvitError(f"top_k must be a positive integer, got {top_k!r}.")


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DistvitError(f"device {device!r} is not a torch device ({err}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistvitError(f"device {device} was requested but CUDA is not available; use device=cpu.")
    return device


@torch.no_grad()
def _run(
    model: torch.nn.Module,
    paths: list[str],
    prepare: Callable[[list[str]], torch.Tensor],
    class_names: list[str],
    top_k: int,
    device: torch.device,
    batch_size: int,
) -> list[Prediction]:
    model.eval().to(device)
    k = min(top_k, len(class_names))
    predictions = []
    for batch in _batches(paths, batch_size):
        logits = model(prepare(batch).to(device))
        probs = torch.softmax(logits.float(), dim=1).cpu()
        values, indices = probs.topk(k, dim=1)
        for path, vals, idxs in zip(batch, values.tolist(), indices.tolist()):
            predictions.append(Prediction(path, [(class_names[i], i, p) for p, i in zip(vals, idxs)]))
    return predictions


# -- checkpoint -----------------------------------------------------------------------------------------


def _class_names(payload: dict[str, Any], num_classes: int) -> list[str]:
    classes = payload.get("classes")
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return [f"class_{i}" for i in range(num_classes)]


def predict_checkpoint(
    checkpoint_path: str | os.PathLike,
    image_paths: Sequence[str | os.PathLike],
    top_k: int = 5,
    weights: str = "model",
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
) -> list[Prediction]:
    """Top-k classes of each image under a distvit checkpoint (file or run directory), with the
    training preprocessing. weights="ema" uses the checkpoint's EMA weights."""
    _check_top_k(top_k)
    device = _device(device)
    paths = _check_paths(image_paths)
    model, record, payload = load_model(checkpoint_path, weights)
    stored = payload.get("data_image_size")
    stored_size = (int(stored[0]), int(stored[1])) if stored else (record.img_size, record.img_size)
    transform = BatchTransform((record.img_size, record.img_size), tuple(record.mean), tuple(record.std))

    def prepare(batch: list[str]) -> torch.Tensor:
        arrays = [fit_to_size(array, stored_size) for array in load_images(batch)]
        return transform(torch.from_numpy(np.stack(arrays)))

    return _run(model, paths, prepare, _class_names(payload, record.num_classes), top_k, device, batch_size)


# -- pretrained timm model ------------------------------------------------------------------------------


def _pretrained_model(model_name: str, pretrained: bool | str | os.PathLike) -> torch.nn.Module:
    if not timm.is_model(model_name):
        raise DistvitError(f"{model_name!r} is not a timm model (see timm.list_models()).")
    if pretrained is False:
        return timm.create_model(model_name, pretrained=False)
    if pretrained is True:
        try:
            return timm.create_model(model_name, pretrained=True)
        except Exception as err:  # hub clients raise many types (offline, not found, timeouts)
            raise DistvitError(
                f"could not download pretrained weights for {model_name} from the hub ({type(err).__name__}: {err}). "
                f"Without network access, save them where you can (timm.create_model('{model_name}', "
                f"pretrained=True) then torch.save(model.state_dict(), 'weights.pth')) and pass the local "
                f"weights file with --pretrained PATH."
            ) from None
    path = Path(pretrained).expanduser().resolve()
    if not path.is_file():
        raise DistvitError(f"--pretrained {pretrained}: weights file {path} does not exist.")
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as err:  # torch / safetensors loaders and load_state_dict raise many types
        raise DistvitError(
            f"--pretrained {path}: cannot load it into {model_name} ({type(err).__name__}: {err}). The file must "
            f"hold a state dict of that architecture (.pth/.bin/.safetensors)."
        ) from None


def pretrained_class_names(model: torch.nn.Module) -> list[str]:
    """ImageNet descriptions when the head has ImageNet(-1k/-21k) classes, else class_<i>."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    subset = timm.data.infer_imagenet_subset(model) or ("imagenet-1k" if num_classes == 1000 else None)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def predict_pretrained(
    model_name: str,
    image_paths: Sequence[str | os.PathLike],
    pretrained: bool | str | os.PathLike = True,
    top_k: int = 5,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
) -> list[Prediction]:
    """Top-k classes of each image under a pretrained timm model (hub weights, or a local weights file),
    with timm's eval transform for the model's data config."""
    _check_top_k(top_k)
    device = _device(device)
    paths = _check_paths(image_paths)
    model = _pretrained_model(model_name, pretrained)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    def prepare(batch: list[str]) -> torch.Tensor:
        return torch.stack([transform(Image.fromarray(array)) for array in load_images(batch)])

    return _run(model, paths, prepare, pretrained_class_names(model), top_k, device, batch_size)


# -- output ---------------------------------------------------------------------------------------------


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One block per image: `path:` then `  probability  class (index)` lines, most probable first."""
    blocks = []
    for pred in predictions:
        lines = [f"{pred.path}:"] + [f"  {prob:.3f}  {name} ({index})" for name, index, prob in pred.top]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def predictions_to_json(predictions: Sequence[Prediction]) -> list[dict[str, Any]]:
    return [
        {
            "path": pred.path,
            "top": [{"class": name, "index": index, "probability": prob} for name, index, prob in pred.top],
        }
        for pred in predictions
    ]
