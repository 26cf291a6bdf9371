"""The sweep folder (its own, bound to one search) and the Optuna study in its journal."""

from __future__ import annotations

import json

import pytest

from distvit.errors import ConfigError
from distvit.sweep.folder import load_sweep, open_sweep
from distvit.sweep.spec import load_sweep_file
from distvit.sweep.study import SweepStudy
from tests.support.sweeps import folder_snapshot, write_sweep


def test_a_folder_with_other_files_is_refused_and_left_as_it_was(small_dataset, tmp_path):
    spec = load_sweep_file(write_sweep(tmp_path, small_dataset))
    spec.dir.mkdir()
    (spec.dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"is not empty \(notes.txt\) and holds no distvit sweep"):
        open_sweep(spec)
    assert folder_snapshot(spec.dir) == {"notes.txt": b"mine"}
    with pytest.raises(ConfigError, match="is not a distvit sweep folder"):
        load_sweep(spec.dir)


def test_workers_started_together_on_a_new_folder_all_join_the_one_sweep(small_dataset, tmp_path):
    """A Slurm array starts its workers at once: each sees the others' lock file (and sweep.json's temp
    file while one writes it) in the new folder, and must join, not refuse the folder as someone else's."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        path = write_sweep(tmp_path, small_dataset, name=f"r{round_}")
        start, results = context.Barrier(6), context.Queue()
        workers = [context.Process(target=_open_together, args=(str(path), start, results)) for _ in range(6)]
        for worker in workers:
            worker.start()
        opened = sorted(results.get(timeout=60) for _ in workers)
        for worker in workers:
            worker.join()
        assert opened == ["ok"] * 6, opened
        assert sorted(p.name for p in load_sweep_file(path).dir.iterdir()) == [".sweep-lock", "sweep.json"]


def _open_together(path: str, start, results) -> None:
    spec = load_sweep_file(path)
    start.wait()
    try:
        open_sweep(spec)
        results.put("ok")
    except ConfigError as err:
        results.put(str(err))


def test_only_a_creating_workers_own_files_are_tolerated(small_dataset, tmp_path):
    spec = load_sweep_file(write_sweep(tmp_path, small_dataset))
    spec.dir.mkdir()
    (spec.dir / ".sweep-lock").write_text("")
    (spec.dir / "sweep.json.tmp").write_text("{")  # a worker writing the record right now
    open_sweep(spec)
    assert load_sweep(spec.dir).search() == spec.search()
    (tmp_path / "b").mkdir()
    other = load_sweep_file(write_sweep(tmp_path / "b", small_dataset))
    other.dir.mkdir(parents=True)
    (other.dir / ".sweep-lock").write_text("")
    (other.dir / "results.csv").write_text("mine")
    with pytest.raises(ConfigError, match=r"is not empty \(results.csv\)"):
        open_sweep(other)
    assert folder_snapshot(other.dir) == {".sweep-lock": b"", "results.csv": b"mine"}


def test_a_second_sweep_joins_only_with_the_same_search(small_dataset, tmp_path):
    first = open_sweep(load_sweep_file(write_sweep(tmp_path, small_dataset)))
    stored = load_sweep(first.dir)
    assert stored.search() == first.search() and stored.trials == 2
    # More trials, same search: joins, and the folder's number of trials follows.
    more = open_sweep(load_sweep_file(write_sweep(tmp_path, small_dataset, trials=5)))
    assert load_sweep(more.dir).trials == 5
    before = folder_snapshot(first.dir)
    changed = write_sweep(tmp_path, small_dataset, space={"optim.lr": {"loguniform": [1.0e-5, 3.0e-3]}})
    with pytest.raises(ConfigError) as caught:
        open_sweep(load_sweep_file(changed))
    assert "holds a study with another search (space.0.low: 0.0001 -> 1e-05)" in str(caught.value)
    base_changed = load_sweep_file(write_sweep(tmp_path, small_dataset), ["train.epochs=4"])
    with pytest.raises(ConfigError, match=r"another search \(base.train.epochs: 3 -> 4\)"):
        open_sweep(base_changed)
    assert folder_snapshot(first.dir) == before
    assert json.loads((first.dir / "sweep.json").read_text())["distvit_sweep"] == 1


def _asked(tmp_path, small_dataset, name, seed, trials=3):
    spec = open_sweep(load_sweep_file(write_sweep(tmp_path, small_dataset, name=name, sampler={"seed": seed})))
    study = SweepStudy(spec)
    asked = []
    for value in range(trials):
        number, params = study.ask()
        study.tell(number, "COMPLETE", float(value))
        asked.append(params)
    return asked, study


def test_a_serial_sweep_with_a_seed_asks_the_same_parameters(small_dataset, tmp_path):
    first, study = _asked(tmp_path, small_dataset, "a", seed=3)
    again, _ = _asked(tmp_path, small_dataset, "b", seed=3)
    other, _ = _asked(tmp_path, small_dataset, "c", seed=4)
    assert first == again and first != other
    assert len({p["optim.lr"] for p in first}) == 3  # each trial its own seed: no repeats
    assert study.states() == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE"} and study.finished() == 3


def test_a_grid_takes_every_point_once(small_dataset, tmp_path):
    space = {"optim.lr": {"grid": [1e-3, 1e-4]}, "augment.preset": {"grid": ["none", "crop_flip", "lesson"]}}
    path = write_sweep(tmp_path, small_dataset, space=space)
    path.write_text(path.read_text().replace("trials: 2\n", ""))
    study = SweepStudy(open_sweep(load_sweep_file(path)))
    points = set()
    for _ in range(6):
        number, params = study.ask()
        points.add((params["optim.lr"], params["augment.preset"]))
        study.tell(number, "COMPLETE", 0.5)
    assert len(points) == 6


def test_asha_prunes_a_trial_worse_than_the_first_at_the_first_rung(small_dataset, tmp_path):
    pruner = {"type": "asha", "min_epochs": 1, "reduction_factor": 3}
    study = SweepStudy(open_sweep(load_sweep_file(write_sweep(tmp_path, small_dataset, pruner=pruner))))
    first, _ = study.ask()
    second, _ = study.ask()
    assert study.report(first, 1, 2.0) is False  # loss, minimised: the first at a rung is promoted
    assert study.report(second, 1, 2.5) is True
    assert study.report(second, 1, 1.0) is False  # an epoch is reported once: a resumed trial's repeat is ignored
    study.tell(second, "PRUNED", note="pruned")
    study.tell(second, "COMPLETE", 0.1)  # told once: a second tell changes nothing
    trial = study.trials()[second]
    assert trial.state.name == "PRUNED" and trial.value == 2.5 and trial.user_attrs == {"note": "pruned"}
