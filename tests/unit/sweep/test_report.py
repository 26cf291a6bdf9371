"""The sweep report's table, best trial and CSV."""

from __future__ import annotations

from distvit.sweep.report import Row, _csv, best_row, format_table
from distvit.sweep.spec import Objective, Param, SweepSpec


def _spec(direction="maximize"):
    space = (
        Param("optim.lr", "loguniform", low=1e-4, high=1e-2),
        Param("augment.preset", "choice", values=("none", "deit")),
    )
    return SweepSpec("s", dir=None, base={}, space=space, objective=Objective("accuracy", "test", direction), trials=3)


ROWS = [
    Row(0, {"optim.lr": 0.001234, "augment.preset": "none"}, 0.81, 3, "COMPLETE", 12.4),
    Row(1, {"optim.lr": 0.0002, "augment.preset": "deit"}, 0.42, 1, "PRUNED", 5.0, "pruned by the sweep"),
    Row(2, {"optim.lr": 0.009, "augment.preset": "deit"}, 0.86, 3, "COMPLETE", 11.0),
    Row(3, {}, None, None, "FAIL", 1.0, "the run exited with status 1"),
]


def test_the_table_lists_every_trial():
    assert format_table(_spec(), ROWS).splitlines() == [
        "s: 4 trials (2 COMPLETE, 1 PRUNED, 1 FAIL); best: trial 0002, accuracy 0.86",
        "trial  optim.lr  augment.preset  accuracy  epochs  state     seconds",
        "0000   0.001234  none            0.81      3       COMPLETE  12",
        "0001   0.0002    deit            0.42      1       PRUNED    5",
        "0002   0.009     deit            0.86      3       COMPLETE  11",
        "0003                                               FAIL      1",
    ]


def test_the_best_trial_is_complete_and_best_in_the_objectives_direction():
    assert best_row(_spec(), ROWS).trial == 2
    assert best_row(_spec("minimize"), ROWS).trial == 0  # a pruned trial's lower value does not count
    assert best_row(_spec(), ROWS[1:2]) is None


def test_the_csv_has_a_row_per_trial():
    lines = _csv(_spec(), ROWS).decode().splitlines()
    assert lines[0] == "trial,optim.lr,augment.preset,accuracy,epochs,state,seconds,note"
    assert lines[2] == "1,0.0002,deit,0.42,1,PRUNED,5.0,pruned by the sweep" and len(lines) == 5
