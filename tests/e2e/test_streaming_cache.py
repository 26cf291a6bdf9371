"""Training straight from a remote through a bounded cache: shards served over HTTP on loopback, a cache
of a quarter of the dataset, 2 ranks, a stop and a resume on 1 rank."""

from __future__ import annotations

import functools
import json
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from distvit.data.manifest import read_manifest
from distvit.data.plan import window_order
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.cache import ShardCache, folder_bytes, pass_required_bytes, shard_bytes
from distvit.run.checkpoint_files import load_checkpoint
from distvit.run.rundir import read_summary
from tests.support.helpers import REPO, accelerate_launch, launch_ok, run_cli, trace_ids

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served_dataset(tmp_path_factory):
    """200 train / 101 test images in shards of 10, served by an HTTP server on 127.0.0.1; (url, bytes)."""
    folder = tmp_path_factory.mktemp("remote") / "ds"
    prepare_synthetic(folder, train_size=200, test_size=101, samples_per_shard=10)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        total = sum(p.stat().st_size for p in folder.glob("*.tar"))
        yield f"http://127.0.0.1:{server.server_address[1]}/{{name}}", total, folder
    finally:
        server.shutdown()


def test_a_quarter_size_cache_trains_every_sample_once_and_resumes_exactly(served_dataset, tmp_path):
    url, total, _ = served_dataset
    limit = total // 4
    common = [
        "--config",
        "configs/demo.yaml",
        f"data.remote={url}",
        f"data.cache_limit={limit}",
        "data.shuffle_window=1",
        "data.num_workers=0",
        "data.trace_samples=true",
        "train.epochs=2",
        "train.batch_size=20",
        "eval.batch_size=20",
        "optim.name=sgd",
        "optim.lr=0.05",
        "train.mixed_precision=no",
        "tracking.backend=none",
    ]

    def run(ranks: int, name: str, *extra: str):
        where = [f"data.path={tmp_path / name / 'manifest'}", f"data.cache_dir={tmp_path / name / 'cache'}"]
        return launch_ok(ranks, [*common, *where, f"run.dir={tmp_path / name / 'run'}", *extra])

    full = run(2, "full")
    assert "windows of 1 shards shuffled; streamed through" in full.stdout
    cut = tmp_path / "cut" / "run"
    run(2, "cut", "train.stop_at_step=13")  # 3 steps into epoch 2
    assert json.loads((cut / "checkpoints" / "latest.json").read_text())["step"] == 13
    resumed = run(1, "cut", "train.resume=auto")
    assert "resumed from" in resumed.stdout and "at step 13" in resumed.stdout
    for epoch, ids in trace_ids(cut).items():
        assert sorted(ids) == list(range(200)), f"epoch {epoch}: samples missed or repeated"
    for name in ("full", "cut"):
        cache = read_summary(tmp_path / name / "run")["data_cache"]
        assert cache["limit"] == limit and 0 < cache["peak_bytes"] <= limit, cache
        assert cache["evicted"] > 0  # the dataset did not fit: shards came and went
        assert folder_bytes(tmp_path / name / "cache") <= limit  # every file in the folder, bookkeeping included
    a, b = load_checkpoint(tmp_path / "full" / "run"), load_checkpoint(cut)
    assert a["step"] == b["step"] == 20
    difference = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert difference < 1e-5  # 2 ranks -> 1 rank: the same samples per step, summed in another order
    assert Path(tmp_path / "full" / "manifest" / "manifest.json").is_file()
    assert not list((tmp_path / "full" / "manifest").glob("*.tar"))  # no copy of the dataset beside it
    # `distvit evaluate RUN` streams through the run's cache too, and counts what training counted
    out = tmp_path / "eval.json"
    result = run_cli(["evaluate", str(tmp_path / "full" / "run"), "--batch-size", "20", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    final = read_summary(tmp_path / "full" / "run")["final"]
    assert json.loads(out.read_text())["correct"] == final["correct"] and final["num_samples"] == 101


def test_a_cache_too_small_for_a_later_epoch_stops_every_rank_before_the_first_step(
    served_dataset, tmp_path, monkeypatch
):
    """The limit holds what epoch 1 reads at once but not epoch 2 (windows pair other shards): both ranks
    stop with the same one-line error before any step, instead of training epoch 1 and failing at epoch 2."""
    url, _, folder = served_dataset
    manifest = read_manifest(folder)

    def need(split, order, batch):
        shards = manifest.splits[split].shards
        starts = np.cumsum([0] + [shard.num_samples for shard in shards])
        sizes = np.array([shard_bytes(shard) for shard in shards])
        return pass_required_bytes(order, batch, 2, [0, 1], starts, sizes, 0)[0]

    def epoch_need(seed, epoch):  # batches of 16 straddle the windows of 1 shard: 2 or 3 shards at once
        return need("train", window_order([10] * 20, seed, epoch, 1).numpy(), 16)

    evaluation = need("test", np.arange(101), 20)
    seed = next(s for s in range(100) if evaluation <= epoch_need(s, 0) < epoch_need(s, 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the bookkeeping of a node of two ranks
    shards = list({s.name: s for split in ("train", "test") for s in manifest.splits[split].shards}.values())
    probe = ShardCache(str(tmp_path / "probe"), url, 10**9, shards, manifest.num_classes)
    overhead = probe.fetcher.overhead
    probe.close()
    limit = epoch_need(seed, 0) + overhead + 200  # the mark's line (pid, time) may differ by a few bytes
    result = accelerate_launch(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={tmp_path / 'manifest'}",
            f"data.remote={url}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.cache_limit={limit}",
            "data.shuffle_window=1",
            "data.num_workers=0",
            "train.epochs=2",
            "train.batch_size=16",
            "eval.batch_size=20",
            f"train.seed={seed}",
            "tracking.backend=none",
            f"run.dir={tmp_path / 'run'}",
        ],
        monitor_interval=10,  # rank 0 exiting first must not get rank 1 SIGTERMed before its own exit
    )
    assert result.returncode != 0
    expected = f"distvit: error: data.cache_limit={limit} bytes is too small: epoch 2 needs {epoch_need(seed, 1)} bytes"
    assert result.stderr.count(expected) == 1, result.stderr[-3000:]  # one line per node (its local leader)
    for rank in (0, 1):  # both ranks stopped on that error (exit status 2), none waited for the other
        assert re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*exitcode\s*: 2 ", result.stderr), result.stderr
    assert f'File "{REPO / "distvit"}' not in result.stderr  # no rank's traceback (the launcher's is its own)
    assert not (tmp_path / "run" / "metrics.jsonl").is_file() or not (tmp_path / "run" / "metrics.jsonl").read_text()
