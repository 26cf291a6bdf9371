"""The sweep file: parsed into a spec, and every mistake one ConfigError naming the file and the line."""

from __future__ import annotations

import pytest

from distvit.errors import ConfigError
from distvit.sweep.spec import load_sweep_file
from tests.support.helpers import REPO
from tests.support.sweeps import write_sweep


def test_a_sweep_file_becomes_a_spec(small_dataset, tmp_path):
    space = {
        "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
        "train.epochs": {"int": [1, 4], "step": 1},
        "augment.preset": {"choice": ["none", "crop_flip"]},
        "geometry": {"choice": {"small": {"surgery.img_size": 32}, "large": {"surgery.img_size": 64}}},
    }
    path = write_sweep(
        tmp_path, small_dataset, space=space, trials=5, pruner={"min_epochs": 2}, objective={"metric": "accuracy"}
    )
    spec = load_sweep_file(path)
    assert [(p.name, p.kind) for p in spec.space] == [
        ("optim.lr", "loguniform"),
        ("train.epochs", "int"),
        ("augment.preset", "choice"),
        ("geometry", "choice"),
    ]
    assert (spec.space[0].low, spec.space[0].high) == (1.0e-4, 1.0e-2)
    assert spec.space[3].values == ("small", "large") and spec.space[3].settings("large") == {"surgery.img_size": 64}
    assert (spec.objective.metric, spec.objective.split, spec.objective.direction) == ("accuracy", "test", "maximize")
    assert (spec.trials, spec.pruner.type, spec.pruner.min_epochs, spec.pruner.reduction_factor) == (5, "asha", 2, 3)
    assert spec.base["data"]["path"] == str(small_dataset) and spec.base["train"]["batch_size"] == 32
    trial = spec.trial_config({"optim.lr": 0.003, "geometry": "large", "augment.preset": "crop_flip"})
    assert trial["optim"]["lr"] == 0.003 and trial["surgery"]["img_size"] == 64
    assert trial["augment"]["preset"] == "crop_flip" and spec.base["surgery"]["img_size"] == 32  # base untouched
    assert not spec.grid


def test_a_grid_sweep_runs_every_point_by_default(small_dataset, tmp_path):
    space = {"optim.lr": {"grid": [1e-3, 1e-4]}, "augment.preset": {"grid": ["none", "crop_flip", "lesson"]}}
    path = write_sweep(tmp_path, small_dataset, space=space)
    text = path.read_text().replace("trials: 2\n", "")
    path.write_text(text)
    spec = load_sweep_file(path)
    assert spec.grid and spec.trials == 6


def test_overrides_on_the_command_line_change_the_base(small_dataset, tmp_path):
    spec = load_sweep_file(write_sweep(tmp_path, small_dataset), ["train.epochs=5"], directory=tmp_path / "elsewhere")
    assert spec.base["train"]["epochs"] == 5 and spec.dir == tmp_path / "elsewhere"


def _line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    "fields, marker, message",
    [
        ({"triels": 3}, "triels", "unknown key 'triels' in a sweep file (did you mean trials?)"),
        (
            {"space": {"optim.lrr": {"uniform": [0.1, 0.2]}}},
            "optim.lrr",
            "'optim.lrr' is not a config key (did you mean optim.lr?)",
        ),
        ({"space": {"optim.lr": {"uniform": [0.2, 0.1]}}}, "uniform", "range [0.2, 0.1] is empty"),
        ({"space": {"optim.lr": {"loguniform": [0.0, 0.1]}}}, "loguniform", "loguniform needs low > 0"),
        ({"space": {"train.epochs": {"int": [1.5, 3]}}}, "int:", "int needs [low, high], two integers"),
        ({"space": {"train.epochs": {"choice": []}}}, "choice", "choice needs a non-empty list"),
        ({"space": {"train.epochs": {"choice": ["many"]}}}, "train.epochs", "the config refuses 'many'"),
        ({"space": {"optim.lr": {"uniform": [-1.0, 0.1]}}}, "optim.lr", "the config refuses -1.0"),
        ({"space": {"run.dir": {"choice": ["a", "b"]}}}, "run.dir", "'run.dir' is set by the sweep for each trial"),
        ({"space": {"data.augment": {"choice": ["none"]}}}, "data.augment", "`data.augment` moved to `augment.preset`"),
        ({"space": {"optim.lr": {"between": [1, 2]}}}, "optim.lr", "give exactly one of loguniform"),
        (
            {"space": {"optim.lr": {"grid": [0.1, 0.2]}, "train.epochs": {"int": [1, 2]}}},
            "train.epochs",
            "a grid sweep searches every parameter by grid",
        ),
        (
            {"space": {"optim.lr": {"choice": [0.2]}, "v": {"choice": {"a": {"optim.lr": 0.1}}}}},
            "  v:",
            "space.v sets optim.lr, which space.optim.lr sets too",
        ),
        ({"space": {"v": {"choice": {"a": {"optim.lrr": 0.1}}}}}, "optim.lrr", "'optim.lrr' is not a config key"),
        ({"space": {}}, "space", "space is empty"),
        ({"objective": {"metric": "f1"}}, "metric", "objective.metric 'f1' is not one of accuracy"),
        ({"objective": {"metric": "loss", "split": "val"}}, "split", "the trials evaluate on data.eval_split='test'"),
        ({"pruner": {"type": "median"}}, "type", "pruner.type 'median' is not one of asha, none"),
        ({"pruner": {"min_epochs": 0}}, "min_epochs", "pruner.min_epochs must be an integer >= 1"),
        ({"trials": 0}, "trials", "trials must be a positive integer"),
        ({"sampler": {"seed": "x"}}, "seed", "sampler.seed must be a non-negative integer"),
        ({"config": "nope.yaml"}, "config", "config 'nope.yaml': no such file"),
    ],
)
def test_a_mistake_is_one_error_naming_the_line(small_dataset, tmp_path, fields, marker, message):
    path = write_sweep(tmp_path, small_dataset, **fields)
    with pytest.raises(ConfigError) as caught:
        load_sweep_file(path)
    text = str(caught.value)
    assert text.startswith(f"{path}, line {_line_of(path, marker)}: "), text
    assert message in text and "\n" not in text.split(": invalid config value")[0]


def test_overrides_and_the_space_may_not_set_the_same_key(small_dataset, tmp_path):
    path = write_sweep(tmp_path, small_dataset)
    with pytest.raises(ConfigError, match=r"optim.lr=0.1'?: optim.lr is searched by space.optim.lr"):
        load_sweep_file(path, ["optim.lr=0.1"])


def test_the_repository_sweeps_load(small_dataset, tmp_path):
    demo = load_sweep_file(REPO / "configs" / "sweeps" / "demo.yaml", [f"data.path={small_dataset}"])
    assert demo.name == "demo" and demo.trials == 8 and demo.pruner.type == "asha"
    lesson = load_sweep_file(REPO / "configs" / "sweeps" / "lesson.yaml", [f"data.path={small_dataset}"])
    variants = lesson.space[0]
    assert lesson.grid and lesson.trials == 5 and variants.name == "experiment"
    assert set(variants.values) == {
        "head_only_224",
        "all_224",
        "native32_truncate",
        "native32_interpolate",
        "native32_p4",
    }
    assert variants.settings("native32_p4")["surgery.patch_size"] == 4
    assert variants.settings("native32_truncate")["surgery.pos_embed"] == "truncate"
