"""distvit.engine.parts: what build_parts assembles (the optimizer over the trainable parameters, cached
features and the classifier alone for head-only runs, train.cache_features=true refusals) and
compile_model's fallback to eager."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from distvit.augment.transforms import BatchTransform
from distvit.data.manifest import read_manifest
from distvit.data.read.memory import load_split
from distvit.engine.parts import compile_model
from distvit.errors import ConfigError
from tests.support.trainers import make_trainer, open_trainer

HEAD_ONLY = ("surgery.freeze=backbone", "augment.preset=none")


def _optimized(parts) -> list[torch.Tensor]:
    return [p for group in parts.optimizer.param_groups for p in group["params"]]


def test_the_optimizer_covers_exactly_the_trainable_parameters(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", "surgery.freeze=blocks:1") as trainer:
        parts = trainer.parts
        optimized = _optimized(parts)
        trainable = [p for p in parts.model.parameters() if p.requires_grad]
        frozen = [p for p in parts.model.parameters() if not p.requires_grad]
        assert len(optimized) == len({id(p) for p in optimized})  # each parameter once
        assert {id(p) for p in optimized} == {id(p) for p in trainable}
        assert frozen and trainable  # blocks:1 freezes some and trains some
        assert sum(p.numel() for p in optimized) == parts.record.trainable_params
        assert not parts.features_cached and parts.trained is parts.model and not parts.compiled


def test_a_head_only_run_trains_the_classifier_on_cached_features(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", *HEAD_ONLY) as trainer:
        parts, model = trainer.parts, trainer.parts.model
        assert parts.features_cached and parts.trained is model.get_classifier() is model.head
        assert {id(p) for p in _optimized(parts)} == {id(model.head.weight), id(model.head.bias)}
        cached = trainer.sources.train.data
        assert cached.images.shape == (200, 192) and cached.images.dtype == torch.float32
        stored = load_split(small_dataset, read_manifest(small_dataset), "train")
        assert torch.equal(cached.labels, stored.labels)
        assert trainer.sources.feature_seconds is not None and trainer.sources.feature_seconds > 0
        model.eval()
        with torch.no_grad():
            rows = [0, 57, 199]
            direct = model.forward_head(model.forward_features(parts.transform(stored.images[rows])), pre_logits=True)
        torch.testing.assert_close(cached.images[rows], direct, rtol=1e-4, atol=1e-5)


def test_cache_features_false_runs_the_full_forward(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", *HEAD_ONLY, "train.cache_features=false") as trainer:
        assert not trainer.parts.features_cached and trainer.parts.trained is trainer.parts.model
        assert trainer.sources.train.data.images.dtype == torch.uint8 and trainer.sources.feature_seconds is None


def test_cache_features_true_names_what_prevents_it(small_dataset, tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_trainer(small_dataset, tmp_path / "r", "surgery.freeze=backbone", "train.cache_features=true")
    assert str(caught.value) == (
        "train.cache_features=true needs a head-only run, but: augment.preset=crop_flip (needs none). "
        "Leave train.cache_features empty to use it only where possible."
    )


def _small_model() -> tuple[torch.nn.Module, BatchTransform]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    return model, BatchTransform((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(model, *args, **kwargs):
        raise RuntimeError("no compiler backend")

    monkeypatch.setattr(torch, "compile", broken)
    model, transform = _small_model()
    with pytest.warns(UserWarning) as warned:
        result = compile_model(model, transform, (8, 8), 4, Accelerator(cpu=True))
    assert result == (None, 0.0)
    assert [str(w.message) for w in warned] == [
        "train.compile=true: torch.compile failed (RuntimeError: no compiler backend); "
        "training without it on every rank."
    ]


def test_compile_runs_a_forward_and_backward_on_a_dummy_micro_batch(monkeypatch):
    seen = []

    def recording(model, *args, **kwargs):
        def run(x):
            seen.append((tuple(x.shape), x.dtype))
            return model(x)

        return run

    monkeypatch.setattr(torch, "compile", recording)
    model, transform = _small_model()
    compiled, seconds = compile_model(model, transform, (6, 6), 3, Accelerator(cpu=True))
    assert compiled is not None and seconds > 0
    assert seen == [((3, 3, 8, 8), torch.float32)]  # stored size in, the model's input size out of the transform
    assert all(p.grad is None for p in model.parameters())  # the dummy backward leaves no gradients behind
