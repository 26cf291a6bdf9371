"""Prediction from checkpoints (training preprocessing) and from pretrained timm models (timm's eval
transform), on CPU, without network: weights files are saved from random-init models."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import distvit.tools.predict as predict
from distvit.augment.transforms import BatchTransform
from distvit.config import load_config
from distvit.data.images import resize_and_crop
from distvit.data.manifest import read_manifest
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.memory import load_split
from distvit.errors import DistvitError
from distvit.model.build import build_model
from distvit.run.checkpoint_files import save_checkpoint
from distvit.tools.predict import (
    Prediction,
    format_predictions,
    load_images,
    predict_checkpoint,
    predict_pretrained,
    predictions_to_json,
)
from tests.support.helpers import REPO

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic dataset, a (random-init) demo model, its checkpoint and 5 test images as PNG files."""
    tmp = tmp_path_factory.mktemp("predict")
    out = tmp / "data"
    prepare_synthetic(out, train_size=100, test_size=30, samples_per_shard=64)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.path={out}", f"run.dir={tmp}/r"])
    torch.manual_seed(0)
    model, record = build_model(cfg.model, cfg.surgery, 10)
    payload = {
        "model": model.state_dict(),
        "surgery": record.to_dict(),
        "classes": CLASSES,
        "data_image_size": [32, 32],
        "ema": None,
    }
    checkpoint = save_checkpoint(tmp / "ckpt.pt", payload)
    split = load_split(out, read_manifest(out), "test")
    images = split.images[:5]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp / f"test_{i}.png")
        Image.fromarray(image.numpy()).save(paths[-1])
    transform = BatchTransform((record.img_size, record.img_size), record.mean, record.std)
    return dict(
        tmp=tmp,
        model=model.eval(),
        record=record,
        payload=payload,
        checkpoint=checkpoint,
        images=images,
        paths=paths,
        transform=transform,
    )


def _reference(model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model.eval()(inputs), dim=1)


def _check(preds: list[Prediction], reference: torch.Tensor, names: list[str], k: int) -> None:
    assert len(preds) == len(reference)
    for pred, ref in zip(preds, reference):
        assert len(pred.top) == k
        probs = [p for _, _, p in pred.top]
        assert probs == sorted(probs, reverse=True)
        for name, index, prob in pred.top:
            assert name == names[index]
            assert prob == pytest.approx(ref[index].item(), abs=1e-5)
        # the top-k are the k largest reference probabilities (compared by value: robust to ties)
        assert probs == pytest.approx(ref.topk(k).values.tolist(), abs=1e-5)


def test_checkpoint_uses_training_preprocessing(trained):
    preds = predict_checkpoint(trained["checkpoint"], trained["paths"], top_k=10)
    reference = _reference(trained["model"], trained["transform"](trained["images"]))
    _check(preds, reference, CLASSES, 10)
    assert [p.path for p in preds] == [str(p) for p in trained["paths"]]
    # probabilities of all classes sum to one
    assert sum(p for _, _, p in preds[0].top) == pytest.approx(1.0, abs=1e-5)


def test_checkpoint_resizes_other_sizes_like_prepare(trained):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # H=48, W=64: not the stored 32x32
    png, jpg = trained["tmp"] / "wide.png", trained["tmp"] / "wide.jpg"
    Image.fromarray(array).save(png)
    Image.fromarray(array).save(jpg, quality=95)
    decoded = load_images([png, jpg])
    assert np.array_equal(decoded[0], array)
    preds = predict_checkpoint(trained["checkpoint"], [png, jpg, trained["paths"][0]], top_k=3)
    batch = torch.from_numpy(
        np.stack([resize_and_crop(decoded[0], 32), resize_and_crop(decoded[1], 32), trained["images"][0].numpy()])
    )
    _check(preds, _reference(trained["model"], trained["transform"](batch)), CLASSES, 3)


def test_checkpoint_without_stored_size_uses_model_size_and_batches(trained):
    payload = dict(trained["payload"], data_image_size=None)
    payload.pop("ema")
    path = save_checkpoint(trained["tmp"] / "nosize.pt", payload)
    preds = predict_checkpoint(path, trained["paths"], top_k=50, batch_size=2)  # top_k clipped to 10 classes
    _check(preds, _reference(trained["model"], trained["transform"](trained["images"])), CLASSES, 10)


def test_run_directory(trained):
    run = trained["tmp"] / "run"
    save_checkpoint(run / "checkpoints" / "final.pt", trained["payload"])
    preds = predict_checkpoint(run, trained["paths"][:2], top_k=1)
    assert [len(p.top) for p in preds] == [1, 1]


def test_ema_weights(trained):
    with pytest.raises(DistvitError, match="ema"):
        predict_checkpoint(trained["checkpoint"], trained["paths"][:1], weights="ema")
    payload = dict(trained["payload"])
    payload.pop("ema")
    missing = save_checkpoint(trained["tmp"] / "noema.pt", payload)
    with pytest.raises(DistvitError, match="ema.enabled=false"):
        predict_checkpoint(missing, trained["paths"][:1], weights="ema")
    with pytest.raises(DistvitError, match="weights"):
        predict_checkpoint(trained["checkpoint"], trained["paths"][:1], weights="best")

    ema = {k: v.clone() for k, v in trained["model"].state_dict().items()}
    ema["head.weight"].zero_()
    ema["head.bias"] = torch.arange(10, dtype=ema["head.bias"].dtype)
    path = save_checkpoint(trained["tmp"] / "ema.pt", dict(trained["payload"], ema=ema))
    ema_preds = predict_checkpoint(path, trained["paths"], top_k=10, weights="ema")
    expected = torch.softmax(torch.arange(10, dtype=torch.float32), dim=0)
    for pred in ema_preds:
        assert pred.top[0][:2] == ("c9", 9)
        for _, index, prob in pred.top:
            assert prob == pytest.approx(expected[index].item(), abs=1e-5)
    model_preds = predict_checkpoint(path, trained["paths"], top_k=10, weights="model")
    _check(model_preds, _reference(trained["model"], trained["transform"](trained["images"])), CLASSES, 10)


def test_pretrained_file_matches_timm_eval_pipeline(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    reference_model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    weights = tmp_path / "deit_tiny.safetensors"
    safetensors_torch.save_file(reference_model.state_dict(), str(weights))
    rng = np.random.default_rng(1)
    image_path = tmp_path / "capybara.png"
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(image_path)

    preds = predict_pretrained("deit_tiny_patch16_224", [image_path], pretrained=str(weights), top_k=3)
    transform = create_transform(**resolve_data_config({}, model=reference_model))
    with Image.open(image_path) as image:
        inputs = transform(image.convert("RGB")).unsqueeze(0)
    reference = _reference(reference_model, inputs)
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    _check(preds, reference, names, 3)
    assert all(name in names for name, _, _ in preds[0].top)


def test_pretrained_errors(tmp_path, monkeypatch):
    image_path = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image_path)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(predict.timm, "create_model", offline)
    with pytest.raises(DistvitError, match="--pretrained PATH"):
        predict_pretrained("deit_tiny_patch16_224", [image_path], pretrained=True)
    with pytest.raises(DistvitError, match="does not exist"):
        predict_pretrained("deit_tiny_patch16_224", [image_path], pretrained=str(tmp_path / "none.pth"))
    with pytest.raises(DistvitError, match="not a timm model"):
        predict_pretrained("deit_tinyy", [image_path], pretrained=True)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not weights")
    monkeypatch.undo()
    with pytest.raises(DistvitError, match="cannot load"):
        predict_pretrained("deit_tiny_patch16_224", [image_path], pretrained=str(garbage))


def test_missing_and_undecodable_images(trained, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(DistvitError, match="nope.png"):
        predict_checkpoint(trained["checkpoint"], [trained["paths"][0], missing])
    with pytest.raises(DistvitError, match="nope.png"):
        load_images([missing])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DistvitError, match="broken.jpg"):
        load_images([broken])
    with pytest.raises(DistvitError, match="broken.jpg"):
        predict_checkpoint(trained["checkpoint"], [broken])
    with pytest.raises(DistvitError, match="top_k"):
        predict_checkpoint(trained["checkpoint"], trained["paths"][:1], top_k=0)


def test_formatting():
    preds = [Prediction("cat.png", [("cat", 3, 0.9123), ("dog", 5, 0.05)]), Prediction("b.png", [("dog", 5, 0.7)])]
    assert format_predictions(preds) == "cat.png:\n  0.912  cat (3)\n  0.050  dog (5)\nb.png:\n  0.700  dog (5)"
    assert predictions_to_json(preds)[0] == {
        "path": "cat.png",
        "top": [{"class": "cat", "index": 3, "probability": 0.9123}, {"class": "dog", "index": 5, "probability": 0.05}],
    }
