"""distvit.engine.evaluator: when evaluation is due, and what a run's evaluation records (state.last_eval,
metrics.jsonl, eval/confusion.json) and returns (the EMA's accuracy when there is one)."""

from __future__ import annotations

import json

import pytest
import torch

from distvit.config import EvalConfig
from distvit.data.manifest import read_manifest
from distvit.data.read.memory import load_split
from distvit.engine.evaluator import Evaluator
from tests.support.trainers import open_trainer


def _evaluator(epochs: int, every: int) -> Evaluator:
    return Evaluator(EvalConfig(every=every), context=None, data=None, transform=None, epochs=epochs)


def test_the_evaluation_batch_splits_evenly_over_the_ranks():
    from distvit.engine.evaluator import check_eval_batch
    from distvit.errors import ConfigError

    check_eval_batch(EvalConfig(batch_size=64), 4)
    with pytest.raises(ConfigError) as caught:
        check_eval_batch(EvalConfig(batch_size=66), 4)
    assert str(caught.value) == (
        "eval.batch_size=66 is a global batch size: it must be divisible by the number of processes (4). "
        "Choose a multiple of 4."
    )


@pytest.mark.parametrize(
    "epochs, every, due",
    [(5, 1, [1, 2, 3, 4, 5]), (5, 2, [2, 4, 5]), (7, 3, [3, 6, 7]), (5, 0, [5]), (4, 2, [2, 4]), (1, 0, [1])],
)
def test_due_every_n_epochs_and_after_the_last(epochs, every, due):
    evaluator = _evaluator(epochs, every)
    assert [epoch for epoch in range(1, epochs + 1) if evaluator.due(epoch)] == due


def _fixed_ranking(model: torch.nn.Module, bias: torch.Tensor) -> None:
    """Make the classifier ignore the image: logits = bias for every input."""
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(bias)


def test_run_records_counts_confusion_and_returns_the_ema_accuracy(small_dataset, tmp_path):
    labels = load_split(small_dataset, read_manifest(small_dataset), "test").labels
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 101 and counts[0] != counts[9]  # the two models below must score differently
    raw_bias = -torch.arange(10.0)  # predicts class 0; top-5 is classes 0..4
    ema_bias = torch.arange(10.0)  # predicts class 9; top-5 is classes 5..9
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        _fixed_ranking(trainer.parts.model, raw_bias)
        _fixed_ranking(trainer.parts.ema.module, ema_bias)
        trainer.state.epoch, trainer.state.step = 2, 8
        score = trainer.evaluator.run(trainer._models(), trainer.state)
    last = trainer.state.last_eval
    assert {k: last[k] for k in ("split", "epoch", "step", "num_samples")} == {
        "split": "test",
        "epoch": 2,
        "step": 8,
        "num_samples": 101,
    }
    assert last["correct"] == counts[0] and last["accuracy"] == counts[0].item() / 101
    assert last["ema_correct"] == counts[9] and last["ema_accuracy"] == counts[9].item() / 101
    assert score == last["ema_accuracy"] != last["accuracy"]
    assert last["top5"] == counts[:5].sum().item() / 101 and last["ema_top5"] == counts[5:].sum().item() / 101
    expected_loss = (torch.logsumexp(raw_bias, 0) - raw_bias[labels]).mean().item()
    assert last["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert last["per_class_accuracy"] == [1.0] + [0.0] * 9 and last["ema_per_class_accuracy"] == [0.0] * 9 + [1.0]
    confusion = json.loads((tmp_path / "r" / "eval" / "confusion.json").read_text())
    assert (confusion["split"], confusion["epoch"], confusion["step"]) == ("test", 2, 8)
    assert confusion["classes"] == trainer.classes and len(confusion["classes"]) == 10
    for name, predicted in (("model", 0), ("ema", 9)):
        matrix = torch.tensor(confusion[name])
        assert matrix.shape == (10, 10) and matrix.sum() == 101
        assert torch.equal(matrix[:, predicted], counts)  # confusion[true][predicted]
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["split"] == "test" and logged[-1]["ema_correct"] == counts[9]


def test_without_ema_the_raw_accuracy_is_the_score(small_dataset, tmp_path):
    labels = load_split(small_dataset, read_manifest(small_dataset), "test").labels
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        _fixed_ranking(trainer.parts.model, torch.nn.functional.one_hot(torch.tensor(3), 10).float())  # class 3
        score = trainer.evaluator.run({"model": trainer.parts.model}, trainer.state)
    assert score == (labels == 3).sum().item() / 101 == trainer.state.last_eval["accuracy"]
    assert not any(key.startswith("ema_") for key in trainer.state.last_eval)
    confusion = json.loads((tmp_path / "r" / "eval" / "confusion.json").read_text())
    assert "ema" not in confusion and sum(map(sum, confusion["model"])) == 101
    assert [row[3] for row in confusion["model"]] == torch.bincount(labels, minlength=10).tolist()
