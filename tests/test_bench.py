"""`distvit bench data` runs all pipelines and prints sane numbers and ratios (not a timing assertion)."""

from __future__ import annotations

import json

from helpers import run_cli


def test_bench_data_smoke(small_dataset, tmp_path):
    result = run_cli(["bench", "data", "--data", str(small_dataset), "--steps", "3", "--warmup", "1",
                      "--batch-size", "32", "--json", str(tmp_path / "bench.json")])
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0].startswith("lesson") and names[1].startswith("distvit memory") and names[2].startswith("distvit stream")
    for r in report["results"]:
        assert r["images_per_sec"] > 0 and r["batches"] == 3
        assert abs(r["ratio_to_lesson"] - r["images_per_sec"] / report["results"][0]["images_per_sec"]) < 1e-9
    assert "x lesson" in result.stdout and report["batch_size"] == 32


def test_bench_data_bad_split_is_clear(small_dataset):
    result = run_cli(["bench", "data", "--data", str(small_dataset), "--split", "nope"])
    assert result.returncode == 2 and "Available splits: train, test" in result.stderr


def test_bench_batch_larger_than_split_is_refused(small_dataset):
    result = run_cli(["bench", "data", "--data", str(small_dataset), "--split", "test", "--batch-size", "200"])
    assert result.returncode == 2 and "larger than split 'test' (101 images)" in result.stderr
