"""distvit.engine.ema: the decay sized to the run, warmup, the update itself, frozen tensors, state."""

from __future__ import annotations

import pytest
import torch

from distvit.config import EmaConfig
from distvit.engine.ema import ModelEma, decay_for_run


def test_ema_decay_follows_the_run_length_and_updates():
    assert decay_for_run(EmaConfig(horizon=0.1), 1000) == pytest.approx(0.99)
    assert decay_for_run(EmaConfig(decay=0.5), 1000) == 0.5
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9, warmup=False)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * start + 0.1 * model.weight)
    warm = ModelEma(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early weights do not dominate
    frozen = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    frozen[0].requires_grad_(False)
    assert len(ModelEma(frozen, 0.9, False)._pairs) == 2  # only the trainable weight and bias are averaged


def test_decay_for_run():
    assert decay_for_run(EmaConfig(decay=0.9, horizon=0.5), 10) == 0.9  # an explicit decay wins
    assert decay_for_run(EmaConfig(horizon=1.0), 50) == pytest.approx(0.98)
    assert decay_for_run(EmaConfig(horizon=0.25), 400) == pytest.approx(0.99)
    assert decay_for_run(EmaConfig(horizon=0.1), 5) == 0.0  # a horizon under one step: the EMA follows the model


def test_warmup_decay_schedule():
    model = torch.nn.Linear(2, 2)
    ema = ModelEma(model, decay=0.5, warmup=True)
    used = []
    for _ in range(10):
        used.append(ema.current_decay())
        ema.update(model)
    # (1 + t) / (10 + t) until it reaches the configured decay
    assert used == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 0.5, 0.5])
    assert ema.updates == 10
    plain = ModelEma(model, decay=0.5, warmup=False)
    assert plain.current_decay() == 0.5


def test_update_is_the_lerp_towards_the_model_with_the_current_decay():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.75, warmup=True)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            model.weight.mul_(-2.0).add_(step)
            model.bias.add_(1.0)
        decay = (1 + step) / (10 + step)  # warmup: 0.1, 2/11, 3/12, all under 0.75
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in model.state_dict().items()}
        ema.update(model)
        for name, value in ema.module.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    assert not torch.equal(ema.module.weight, model.weight)  # a copy, not the model's tensors


def test_frozen_parameters_are_not_averaged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ema = ModelEma(model, decay=0.5, warmup=False)
    frozen = {k: v.clone() for k, v in ema.module[0].state_dict().items()}
    trainable = ema.module[1].weight.clone()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ema.update(model)
    assert all(torch.equal(ema.module[0].state_dict()[k], v) for k, v in frozen.items())
    torch.testing.assert_close(ema.module[1].weight, 0.5 * trainable + 0.5 * model[1].weight)


def test_buffers_are_copied_not_averaged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEma(model, decay=0.9, warmup=False)
    model.train()
    model(torch.randn(16, 4) * 5 + 2)
    model(torch.randn(16, 4))
    assert not torch.equal(ema.module[1].running_mean, model[1].running_mean)
    ema.update(model)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ema.module[1], name), getattr(model[1], name)), name
    assert int(ema.module[1].num_batches_tracked) == 2


def test_state_dict_round_trip_continues_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9, warmup=True)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.5)
        ema.update(model)
    state = ema.state_dict()
    assert state["updates"] == 3 and state["decay"] == 0.9
    torch.save(state, tmp_path / "ema.pt")
    restored = ModelEma(torch.nn.Linear(3, 2), decay=0.9, warmup=True)
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))  # read as checkpoints are
    assert restored.updates == 3 and restored.current_decay() == ema.current_decay() == pytest.approx(4 / 13)
    assert all(torch.equal(restored.module.state_dict()[k], v) for k, v in ema.module.state_dict().items())
    with torch.no_grad():
        model.weight.add_(0.5)
    ema.update(model)
    restored.update(model)
    assert all(torch.equal(restored.module.state_dict()[k], v) for k, v in ema.module.state_dict().items())
