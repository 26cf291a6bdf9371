"""End to end: shards -> accelerate launch distvit/train.py on 1..3 CPU ranks -> evaluated, checkpointed model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.utils import set_seed

from distvit.augment.transforms import BatchTransform
from distvit.config import load_config
from distvit.data.manifest import read_manifest
from distvit.data.read.memory import load_split
from distvit.model.build import build_model
from distvit.run.checkpoint_files import load_checkpoint, load_model
from distvit.run.plots import read_metrics_lines
from distvit.run.rundir import read_summary
from distvit.run.tracking import read_metrics
from tests.support.helpers import REPO, accelerate_launch, launch_ok, run_cli, trace_ids
from tests.support.wandb_records import summarize


def build(cfg, num_classes):
    """build_model from a whole Config (its model and surgery sections)."""
    return build_model(cfg.model, cfg.surgery, num_classes)


pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def check_metrics(run_dir, eval_epochs, eval_samples, steps_per_epoch, log_every=10, loss_falls=True):
    """Evaluation lines at the expected epochs with exact counts; one training line per `log_every` steps
    and at each epoch end; the training loss goes down (over runs long enough to learn)."""
    records = read_metrics(run_dir)
    evals = [r for r in records if r["split"] == "test"]
    assert [r["epoch"] for r in evals] == eval_epochs
    for record in evals:
        assert {"split", "epoch", "step", "accuracy", "num_samples"} <= set(record)
        assert record["num_samples"] == eval_samples
        assert record["step"] == record["epoch"] * steps_per_epoch
    train = [r for r in records if r["split"] == "train"]
    epochs = max(r["epoch"] for r in train)
    expected_steps = sorted(
        {s for s in range(1, epochs * steps_per_epoch + 1) if s % log_every == 0 or s % steps_per_epoch == 0}
    )
    assert [r["step"] for r in train] == expected_steps
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in train)  # lr used by the step
    if loss_falls:
        assert train[-1]["loss"] < train[0]["loss"]
    return evals


def offline_accuracy(run_dir, dataset):
    """Re-evaluate the final checkpoint in this process, on one rank, from its surgery record."""
    model, record, payload = load_model(run_dir)
    model.eval()
    data = load_split(dataset, read_manifest(dataset), "test")
    transform = BatchTransform((record.img_size, record.img_size), record.mean, record.std)
    with torch.no_grad():
        predictions = torch.cat(
            [model(transform(data.images[i : i + 250])).argmax(1) for i in range(0, len(data), 250)]
        )
    return int((predictions == data.labels).sum()), payload


def test_demo_on_two_gloo_ranks_learns_and_checkpoints(demo_run, demo_dataset):
    run_dir, overrides, _ = demo_run

    summary = read_summary(run_dir)
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    final = summary["final"]
    assert final["num_samples"] == 1000  # every test image once, none twice
    assert final["accuracy"] >= 0.9, final
    evals = check_metrics(run_dir, list(range(1, 9)), eval_samples=1000, steps_per_epoch=79)
    assert evals[-1] == final

    resolved = load_config(run_dir / "config.yaml")
    assert resolved == load_config(REPO / "configs/demo.yaml", overrides)

    correct, payload = offline_accuracy(run_dir, demo_dataset)
    assert payload["step"] == summary["steps"] == 8 * 79 and payload["epoch"] == 8
    # Same weights, other batch split (1 rank x 250 vs 2 ranks x 250): float sums may differ in the last
    # bit, so allow a near-tie argmax to flip for a couple of the 1000 images.
    assert abs(correct - final["correct"]) <= 2

    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1  # one W&B run per training run, not one per rank
    logged = summarize(wandb_runs[0])
    assert logged["run_id"] == json.loads((run_dir / "tracker.json").read_text())["wandb_run_id"]
    assert {"model", "surgery", "optim", "world_size"} <= logged["config"]
    accuracies = [float(h["test/accuracy"]) for h in logged["history"] if "test/accuracy" in h]
    assert accuracies == pytest.approx([r["accuracy"] for r in evals])


def test_single_rank_same_config(demo_dataset, tmp_path):
    run_dir = tmp_path / "one"
    launch_ok(
        1,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={demo_dataset}",
            f"run.dir={run_dir}",
            "train.epochs=2",
            "tracking.backend=none",
        ],
    )
    summary = read_summary(run_dir)
    assert summary["world_size"] == 1 and summary["steps"] == 2 * 79
    assert summary["final"]["num_samples"] == 1000
    assert summary["final"]["accuracy"] > 0.2  # chance is 0.1; 2 epochs of the 8-epoch recipe
    check_metrics(run_dir, [1, 2], eval_samples=1000, steps_per_epoch=79)
    seconds = summary["seconds"]  # where the time went
    assert set(seconds) == {"start_up", "training_steps", "evaluation", "checkpoints", "total_before_outputs"}
    parts = seconds["start_up"] + seconds["training_steps"] + seconds["evaluation"] + seconds["checkpoints"]
    assert all(value > 0 for value in seconds.values()) and parts <= seconds["total_before_outputs"]


def test_bf16_on_two_cpu_ranks_with_odd_eval_split(small_dataset, tmp_path):
    run_dir = tmp_path / "bf16"
    launch_ok(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.mixed_precision=bf16",
            "train.epochs=2",
            "train.batch_size=32",
            "eval.batch_size=64",
            "tracking.backend=none",
        ],
    )
    summary = read_summary(run_dir)
    assert summary["mixed_precision"] == "bf16" and summary["compute_dtype"] == "bfloat16"
    # 101 test images over 2 ranks x 32: padded, masked, exact
    check_metrics(run_dir, [1, 2], eval_samples=101, steps_per_epoch=7, loss_falls=False)


def test_three_ranks_count_every_sample_once(small_dataset, tmp_path):
    run_dir = tmp_path / "three"
    launch_ok(
        3,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.epochs=2",
            "train.batch_size=48",
            "eval.batch_size=48",
            "eval.every=2",
            "train.log_every=2",
            "checkpoint.every_epochs=1",
            "tracking.backend=none",
        ],
    )
    summary = read_summary(run_dir)
    assert summary["world_size"] == 3 and summary["steps"] == 2 * 5  # ceil(200 / 48) per epoch
    check_metrics(run_dir, [2], eval_samples=101, steps_per_epoch=5, log_every=2, loss_falls=False)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.pt",
        "epoch_001.pt",
        "final.pt",
        "latest.json",
    ]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["file"] == "final.pt"
    assert load_checkpoint(run_dir / "checkpoints" / "epoch_001.pt")["step"] == 5


EVERY_AUGMENTATION = ["augment.preset=deit", "augment.color_jitter=0.4", "augment.repeats=2"]


@pytest.mark.parametrize("augmentation", [["augment.preset=none"], EVERY_AUGMENTATION], ids=["none", "deit+jitter"])
def test_two_ranks_compute_exactly_what_one_rank_computes_on_the_same_micro_batches(
    small_dataset, tmp_path, augmentation
):
    """Same global batch, fp32, SGD (not scale-invariant like Adam). Two ranks of 16 images per step
    compute bit for bit what one rank computes when it splits each step into the same two micro-batches
    of 16: a sample's augmentation does not depend on the world size, each half's forward and backward is
    the same computation, and the gradients are summed the same way. Both with one CPU thread per rank: a
    kernel's result depends on how many threads split its sums. What differs between a plain 1-rank run
    and 2 ranks is only the float order of the batch's gradient sum (32 rows at once, or 16 + 16):
    measured 2.7e-5 in a weight after 14 steps with every augmentation on, 1.2e-7 without (2026-12-06,
    torch 2.14.1, 2 vCPUs); no tolerance is needed here."""
    common = [
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        "optim.name=sgd",
        "optim.lr=0.05",
        "optim.warmup_epochs=0",
        *augmentation,
        "train.epochs=2",
        "train.batch_size=32",
        "eval.batch_size=64",
        "train.mixed_precision=no",
        "train.cpu_threads=1",
        "tracking.backend=none",
    ]
    launch_ok(1, [*common, f"run.dir={tmp_path}/one", "train.grad_accum_steps=2"])
    launch_ok(2, [*common, f"run.dir={tmp_path}/two"])
    one = load_checkpoint(tmp_path / "one")["model"]
    two = load_checkpoint(tmp_path / "two")["model"]
    assert all(torch.equal(one[k], two[k]) for k in one)
    set_seed(0)  # the runs' initial weights (train.seed=0): training moved them far from there
    initial = build(load_config(REPO / "configs/demo.yaml", [f"data.path={small_dataset}"]), 10)[0].state_dict()
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-2
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if r["split"] == "train"] for d in ("one", "two")]
    # a logged loss sums float32 step losses over the log window: per rank, then across ranks (2 ranks) or
    # micro-batch by micro-batch (1 rank), so the same numbers are added in another order (<= 1e-6 relative)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) >= 2


def test_distilled_deit_trains(small_dataset, tmp_path):
    result = run_cli(
        [
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={tmp_path}/d",
            "model.name=deit_tiny_distilled_patch16_224",
            "train.epochs=1",
            "train.batch_size=50",
            "tracking.backend=none",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path / "d")
    assert summary["surgery"]["num_prefix_tokens"] == 2 and summary["final"]["num_samples"] == 101


def test_bad_config_stops_every_rank_with_one_message(small_dataset):
    result = accelerate_launch(
        2, ["--config", "configs/demo.yaml", f"data.path={small_dataset}", "optim.lrr=1e-3"], timeout=180
    )
    assert result.returncode != 0
    assert result.stderr.count("distvit: error:") == 1
    assert "unknown config key 'optim.lrr' (did you mean optim.lr?)" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


def test_global_batch_not_divisible_by_world_size(small_dataset, tmp_path):
    result = accelerate_launch(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={tmp_path}/r",
            "train.batch_size=33",
            "tracking.backend=none",
        ],
        timeout=180,
    )
    assert result.returncode != 0
    assert result.stderr.count("distvit: error:") == 1
    assert "must be divisible by the number of processes x grad_accum_steps (2 x 1)" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


def test_stream_mode_with_loader_workers_on_two_ranks(small_dataset, tmp_path):
    run_dir = tmp_path / "stream"
    launch_ok(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "data.mode=stream",
            "data.num_workers=2",
            "data.trace_samples=true",
            "train.epochs=2",
            "train.batch_size=32",
            "eval.batch_size=64",
            "tracking.backend=none",
        ],
    )
    for epoch, ids in trace_ids(run_dir).items():
        assert sorted(ids) == list(range(200)), f"epoch {epoch}"
    assert sorted(p.name for p in (run_dir / "trace").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    steps = {p.name: len(read_metrics_lines(p)) for p in (run_dir / "trace").iterdir()}
    assert steps == {"rank0.jsonl": 14, "rank1.jsonl": 14}  # equal steps on both ranks
    check_metrics(run_dir, [1, 2], eval_samples=101, steps_per_epoch=7, loss_falls=False)


def test_bad_shard_skipped_identically_on_every_rank(tmp_path):
    from distvit.data.prepare.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "ds", train_size=120, test_size=30, samples_per_shard=40)
    (tmp_path / "ds" / "train-00001.tar").unlink()
    run_dir = tmp_path / "run"
    result = launch_ok(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={tmp_path}/ds",
            f"run.dir={run_dir}",
            "data.bad_shards=skip",
            "data.trace_samples=true",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.batch_size=16",
            "tracking.backend=none",
        ],
    )
    assert "leaving out 1 bad shard(s)" in result.stdout and "train-00001.tar: missing" in result.stdout
    ids = trace_ids(run_dir)[1]
    assert sorted(ids) == list(range(80))  # the 80 samples of the two remaining shards, once each
    assert read_summary(run_dir)["final"]["num_samples"] == 30


def test_frozen_backbone_under_ddp(small_dataset, tmp_path):
    """freeze=backbone on 2 ranks: DDP and the optimizer take only the head; the backbone stays as built."""
    run_dir = tmp_path / "frozen"
    launch_ok(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "surgery.freeze=backbone",
            "train.epochs=1",
            "train.batch_size=32",
            "tracking.backend=none",
        ],
    )
    trained = load_checkpoint(run_dir)
    set_seed(0)
    initial = build(
        load_config(REPO / "configs/demo.yaml", [f"data.path={small_dataset}", "surgery.freeze=backbone"]), 10
    )[0].state_dict()
    changed = sorted(k for k in initial if not torch.equal(initial[k], trained["model"][k]))
    assert changed == ["head.bias", "head.weight"]
    assert trained["surgery"]["trainable_params"] == 1930
