"""distvit.run.checkpoint_files: atomic writes, safe reads, latest.json, pruning, rebuilding the model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from distvit.config import load_config
from distvit.errors import CheckpointError
from distvit.model.build import build_model, model_from_record
from distvit.model.record import SurgeryRecord
from distvit.run.checkpoint_files import (
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_weights,
    mark_latest,
    prune_periodic,
    resolve_checkpoint,
    save_checkpoint,
)


def build(cfg, num_classes):
    """build_model from a whole Config (its model and surgery sections)."""
    return build_model(cfg.model, cfg.surgery, num_classes)


def config(dataset, *overrides):
    return load_config(None, [f"data.path={dataset}", *overrides])


@pytest.fixture(scope="module")
def tiny():
    """A random-init deit_tiny at 32 px with a 10-class head, and its surgery record."""
    torch.manual_seed(0)
    return build(load_config(None, ["surgery.img_size=32"], check_data=False), 10)


class Exploit:
    """Pickles to a call of os.system: what a tampered checkpoint would run if loaded with plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_prune_keeps_the_newest_periodic_and_the_latest(tmp_path):
    names = ["step_00000002.pt", "epoch_001.pt", "step_00000006.pt", "step_00000008.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**9, 10**9))  # equal times (coarse file system): order by step
    for name in ("best.pt", "final.pt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "latest.json").write_text(json.dumps({"file": "step_00000002.pt"}))
    step_of = {"step_00000002.pt": 2, "epoch_001.pt": 4, "step_00000006.pt": 6, "step_00000008.pt": 8}.get
    deleted = prune_periodic(tmp_path, keep_last=2, step_of=step_of)
    assert sorted(p.name for p in deleted) == ["epoch_001.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "best.pt",
        "final.pt",
        "step_00000002.pt",
        "step_00000006.pt",
        "step_00000008.pt",
    ]
    assert prune_periodic(tmp_path, keep_last=0, step_of=step_of) == []


def test_checkpoint_rebuilds_identical_model(small_dataset, tmp_path):
    cfg = config(small_dataset, "surgery.img_size=32", "surgery.patch_size=8")
    model, record = build_model(cfg.model, cfg.surgery, 10)
    path = save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "surgery": record.to_dict()})
    assert not (tmp_path / "c.pt.tmp").exists()
    rebuilt, rebuilt_record, _ = load_model(path)
    assert rebuilt_record == record
    x = torch.randn(3, 3, 32, 32)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_checkpoint_into_other_surgery_is_clear_error(small_dataset, tmp_path):
    model, record = build(config(small_dataset, "surgery.img_size=32"), 10)
    other = model_from_record(SurgeryRecord.from_dict({**record.to_dict(), "img_size": 64, "grid_size": (4, 4)}))
    with pytest.raises(
        CheckpointError, match=r"different model .*pos_embed: checkpoint \(1, 5, 192\) vs model \(1, 17, 192\)"
    ):
        load_weights(other, model.state_dict(), record, source="ckpt")


def test_foreign_files_are_not_checkpoints(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a readable distvit checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save({"a": 1}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="has no checkpoints/final.pt"):
        load_checkpoint(tmp_path)


def test_save_and_load_round_trip(tmp_path, tiny):
    model, record = tiny
    state = model.state_dict()
    payload = {
        "model": state,
        "step": 12,
        "epoch": 3,
        "surgery": record.to_dict(),
        "classes": ["a", "b"],
        "rng": {"cpu": torch.get_rng_state()},
        "metrics": {"accuracy": 0.5},
        "ema": None,
    }
    path = save_checkpoint(tmp_path / "sub" / "c.pt", payload)
    assert path == tmp_path / "sub" / "c.pt"
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # folder created, no .tmp left
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == 1 and set(loaded) == {"format_version", *payload}
    assert (loaded["step"], loaded["epoch"], loaded["classes"], loaded["ema"]) == (12, 3, ["a", "b"], None)
    assert loaded["metrics"] == {"accuracy": 0.5}
    assert loaded["surgery"] == record.to_dict()
    assert list(loaded["model"]) == list(state)
    assert all(torch.equal(loaded["model"][k], state[k]) and loaded["model"][k].dtype == state[k].dtype for k in state)
    assert torch.equal(loaded["rng"]["cpu"], payload["rng"]["cpu"])


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def crash_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"PK half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(CheckpointError, match=r"failed \(\[Errno 28\] No space left on device\); \d+ MB free there"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # the partial c.pt.tmp was removed
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))


def test_files_that_are_not_checkpoints_are_refused_with_the_reason(tmp_path, tiny):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "list.pt")
    assert str(err.value) == f"{tmp_path / 'list.pt'} is not a distvit checkpoint of format version 1 (found list)."
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "foreign.pt")
    assert str(err.value) == f"{tmp_path / 'foreign.pt'} is not a distvit checkpoint of format version 1 (found None)."
    torch.save({"format_version": 2, "model": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future.pt is not a distvit checkpoint of format version 1 \(found 2\)"):
        load_checkpoint(tmp_path / "future.pt")
    good = save_checkpoint(tmp_path / "good.pt", {"model": tiny[0].state_dict()})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"cut.pt is not a readable distvit checkpoint \(\w+: "):
        load_checkpoint(tmp_path / "cut.pt")
    marker = tmp_path / "pwned"
    torch.save({"format_version": 1, "model": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is not a readable distvit checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()  # read with weights_only: the pickled call never ran
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "absent.pt")
    assert str(err.value) == f"checkpoint {tmp_path / 'absent.pt'} does not exist."


def test_latest_checkpoint_follows_latest_json(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None  # no checkpoints folder: a new run
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert latest_checkpoint(run) is None
    save_checkpoint(checkpoints / "step_00000004.pt", {"step": 4})
    with pytest.raises(CheckpointError) as err:  # a crash between writing a checkpoint and marking it
        latest_checkpoint(run)
    assert str(err.value) == (
        f"{checkpoints} holds checkpoints but no latest.json; pass train.resume=<one of them> explicitly."
    )
    mark_latest(checkpoints, "step_00000004.pt", step=4, epoch=1)
    assert json.loads((checkpoints / "latest.json").read_text()) == {"file": "step_00000004.pt", "step": 4, "epoch": 1}
    assert latest_checkpoint(run) == checkpoints / "step_00000004.pt"
    save_checkpoint(checkpoints / "step_00000008.pt", {"step": 8})
    assert latest_checkpoint(run) == checkpoints / "step_00000004.pt"  # written but not yet marked: not used
    mark_latest(checkpoints, "step_00000008.pt", step=8, epoch=2)
    assert latest_checkpoint(str(run)) == checkpoints / "step_00000008.pt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step_00000004.pt", "step_00000008.pt"]
    (checkpoints / "step_00000008.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        latest_checkpoint(run)
    assert str(err.value) == (
        f"{checkpoints / 'latest.json'} names step_00000008.pt, which is missing; "
        f"point train.resume at a checkpoint file."
    )
    for damaged in ("{not json", "", "[1, 2]", '"step_00000004.pt"', '{"step": 4}', '{"file": 4}'):
        (checkpoints / "latest.json").write_text(damaged)
        with pytest.raises(CheckpointError) as err:
            latest_checkpoint(run)
        assert str(err.value) == (
            f"{checkpoints / 'latest.json'} is damaged; point train.resume at a checkpoint file instead."
        ), damaged


def test_latest_json_names_only_a_checkpoint_beside_it(tmp_path):
    """An absolute path or `../` in latest.json would resume from outside the run folder: refused."""
    outside = save_checkpoint(tmp_path / "elsewhere.pt", {"step": 4})
    checkpoints = tmp_path / "run" / "checkpoints"
    save_checkpoint(checkpoints / "step_00000004.pt", {"step": 4})
    for name in (str(outside), "../../elsewhere.pt", "sub/step_00000004.pt", "..", "."):
        (checkpoints / "latest.json").write_text(json.dumps({"file": name, "step": 4, "epoch": 0}))
        with pytest.raises(CheckpointError) as err:
            latest_checkpoint(tmp_path / "run")
        assert str(err.value) == (
            f"{checkpoints / 'latest.json'} names {name!r}, not a file of {checkpoints}: it may only name a "
            "checkpoint beside it. Point train.resume at a checkpoint file instead."
        )


def test_a_forged_checkpoint_names_what_is_missing(tmp_path, tiny):
    """Required keys missing or of the wrong type, an incomplete surgery record, a model timm would fetch
    from the hub: each one clear error, nothing fetched."""
    model, record = tiny
    forged = save_checkpoint(tmp_path / "forged.pt", {"model": model.state_dict(), "step": "4"})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(forged, require=("model", "surgery", "epoch", "step"))
    assert str(err.value) == (
        f"{forged} is incomplete or damaged: surgery, epoch, step missing or of the wrong type. "
        "Use a checkpoint that distvit wrote (RUN_DIR/checkpoints/)."
    )
    assert load_checkpoint(forged)["step"] == "4"  # a raw read requires nothing
    partial = {k: v for k, v in record.to_dict().items() if k not in ("img_size", "mean")}
    with pytest.raises(CheckpointError, match=r"^the surgery record is incomplete: img_size, mean missing\.$"):
        SurgeryRecord.from_dict(partial)
    hub = save_checkpoint(
        tmp_path / "hub.pt",
        {"model": model.state_dict(), "surgery": {**record.to_dict(), "model_name": "hf-hub:someone/evil-vit"}},
    )
    with pytest.raises(CheckpointError, match=r"names model 'hf-hub:someone/evil-vit', which is not in timm's local"):
        load_model(hub)
    unknown = SurgeryRecord.from_dict({**record.to_dict(), "model_name": "no_such_vit"})
    with pytest.raises(CheckpointError, match=r"names model 'no_such_vit'"):
        model_from_record(unknown)


def test_resolve_checkpoint_of_a_run_directory(tmp_path):
    run = tmp_path / "run"
    periodic = save_checkpoint(run / "checkpoints" / "step_00000002.pt", {"step": 2})
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(run)
    assert str(err.value) == f"run directory {run} has no checkpoints/final.pt: the run did not finish."
    with pytest.raises(CheckpointError, match="has no checkpoints/final.pt"):
        load_model(run)
    assert resolve_checkpoint(str(periodic)) == periodic  # a file is itself
    final = save_checkpoint(run / "checkpoints" / "final.pt", {"step": 4})
    assert resolve_checkpoint(run) == final and load_checkpoint(run)["step"] == 4


def test_prune_orders_by_step_not_by_name_or_file_time(tmp_path):
    steps = {"epoch_002.pt": 20, "step_00000015.pt": 15, "epoch_001.pt": 10, "step_00000005.pt": 5}
    for age, name in enumerate(steps):  # the higher the step, the older the file time
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**9 * (age + 1), 10**9 * (age + 1)))
    for name in ("best.pt", "final.pt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "latest.json").write_text("{damaged")  # protects nothing, breaks nothing
    deleted = prune_periodic(tmp_path, keep_last=1, step_of=steps.get)
    assert sorted(p.name for p in deleted) == ["epoch_001.pt", "step_00000005.pt", "step_00000015.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "epoch_002.pt", "final.pt"]
    assert prune_periodic(tmp_path, keep_last=1, step_of=steps.get) == []


def test_prune_never_deletes_the_checkpoint_latest_json_names(tmp_path):
    steps = {"step_00000002.pt": 2, "step_00000004.pt": 4, "step_00000006.pt": 6}
    for name in steps:
        (tmp_path / name).write_bytes(b"x")
    mark_latest(tmp_path, "step_00000002.pt", step=2, epoch=0)  # a resumed run: latest is the oldest
    deleted = prune_periodic(tmp_path, keep_last=1, step_of=steps.get)
    assert [p.name for p in deleted] == ["step_00000004.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_00000002.pt", "step_00000006.pt"]


def test_load_weights_names_what_differs_and_loads_nothing(tiny):
    model, record = tiny
    torch.manual_seed(1)
    target = model_from_record(record)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])  # another init
    state = dict(model.state_dict())
    state["head.weight"] = torch.zeros(7, 192)
    del state["head.bias"]
    state["head_dist.weight"] = torch.zeros(10, 192)
    with pytest.raises(CheckpointError) as err:
        load_weights(target, state, record, source="run/checkpoints/final.pt")
    assert str(err.value) == (
        f"run/checkpoints/final.pt was written for a different model ({record.architecture()}): "
        f"head.weight: checkpoint (7, 192) vs model (10, 192); missing head.bias; unexpected head_dist.weight. "
        f"Rebuild the model from the checkpoint's surgery record (distvit.run.checkpoint_files.load_model)."
    )
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # refused before loading any
    load_weights(target, model.state_dict(), record, source="ok")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in target.state_dict().items())


def test_load_model_ema_weights_only_when_the_run_kept_them(tmp_path, tiny):
    model, record = tiny
    payload = {"model": model.state_dict(), "surgery": record.to_dict(), "ema": None}
    without = save_checkpoint(tmp_path / "without.pt", payload)
    absent = save_checkpoint(tmp_path / "absent.pt", {"model": model.state_dict(), "surgery": record.to_dict()})
    for path in (without, absent):
        with pytest.raises(CheckpointError) as err:
            load_model(path, weights="ema")
        assert str(err.value).startswith(
            f"{path} holds no EMA weights: the run trained without EMA (ema.enabled=false)."
        )
    with pytest.raises(CheckpointError) as err:
        load_model(without, weights="best")
    assert str(err.value) == "weights must be one of model, ema, got 'best'."
    ema = {k: v + 0.5 for k, v in model.state_dict().items()}
    both = save_checkpoint(tmp_path / "ema.pt", {**payload, "ema": ema})
    averaged, averaged_record, _ = load_model(both, weights="ema")
    assert averaged_record == record
    assert all(torch.equal(averaged.state_dict()[k], ema[k]) for k in ema)
    trained, _, _ = load_model(both)  # default: the trained model's weights
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_full_disk_while_writing_is_one_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1})

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1408 vs 1344\nmore")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, {"step": 2})
    assert str(err.value).startswith(
        f"writing {path} failed ([enforce fail at inline_container.cc:603] . unexpected pos 1408 vs 1344); "
    )
    assert " MB free there. The previous checkpoint is intact" in str(err.value)
    assert load_checkpoint(path)["step"] == 1 and not (tmp_path / "c.pt.tmp").exists()
