"""distvit.tools.bench_report: the benchmark's report (format_train_bench), the scaling line against a
reference result, and the JSON it is read from."""

from __future__ import annotations

import dataclasses
import json

import pytest

from distvit.config import Config
from distvit.errors import DataError
from distvit.tools.bench_report import Measurement, TrainBench, format_train_bench, scaling_line, write_bench_json


def _config() -> dict:
    cfg = Config()
    cfg.surgery.img_size, cfg.train.batch_size = 32, 64
    return cfg.to_dict()


def _measurement(name: str, rate: float, ratio: float | None, syncs: float | None = None) -> Measurement:
    return Measurement(
        name=name,
        images_per_sec=rate,
        step_ms=51.9,
        steps=30,
        phase_fractions={"data": 0.1, "augment": 0.04, "forward_backward": 0.75, "optimizer": 0.15},
        peak_memory_bytes=512 * 2**20,
        peak_memory_kind="process peak RSS (whole run)",
        achieved_tflops=0.0123,
        peak_fraction=0.0456,
        batch_size=64,
        host_syncs_per_step=syncs,
        ratio_to_lesson=ratio,
    )


def _bench(world_size: int = 1, results=(), **changes) -> TrainBench:
    bench = TrainBench(
        config=_config(),
        device="cpu (x86_64, 2 threads)",
        world_size=world_size,
        mixed_precision="no",
        compile_seconds=0.0,
        feature_cache_seconds=0.0,
        tokens_per_image=5,
        train_gflops_per_image=0.1634,
        peak_tflops=0.0812,
        peak_source="measured 1024x1024 float32 matmul",
        results=list(results),
    )
    return dataclasses.replace(bench, **changes)


def test_report_with_the_lesson_ratio():
    bench = _bench(results=[_measurement("distvit", 1234.4, 2.5, syncs=0.0), _measurement("lesson", 493.8, 1.0)])
    lines = format_train_bench(bench).splitlines()
    assert lines[0] == (
        "distvit bench train: deit_tiny_patch16_224 at 32 px, 5 tokens/image, 0.163 GFLOP/image (forward+backward); "
        "batch 64, 1 process(es) on cpu (x86_64, 2 threads), precision no"
    )
    assert lines[1] == "peak 0.1 TFLOP/s (measured 1024x1024 float32 matmul)"
    assert lines[2] == (
        "loop       images/s  ms/step   data  augment  fwd+bwd  optim   peak mem  TFLOP/s  of peak  syncs  x lesson"
    )
    assert lines[3] == (
        "distvit        1234     51.9  10.0%     4.0%    75.0%  15.0%      512MB    0.012    4.56%    0.0     2.50x"
    )
    assert lines[4] == (
        "lesson          494     51.9  10.0%     4.0%    75.0%  15.0%      512MB    0.012    4.56%      -     1.00x"
    )
    assert len({len(line) for line in lines[2:5]}) == 1  # the columns line up
    assert lines[5:] == ["peak mem: process peak RSS (whole run)"]


def test_report_without_baseline_with_compile_features_and_check():
    check = {
        "precision": "bf16",
        "compiled": True,
        "steps": 3,
        "logit_error": 0.0123,
        "logit_tolerance": 0.05,
        "loss_error": 0.004,
        "loss_tolerance": 0.02,
        "update_error": 0.31,
        "update_tolerance": 0.25,
        "passed": False,
    }
    bench = _bench(
        results=[_measurement("distvit", 1000.0, None)], compile_seconds=12.34, feature_cache_seconds=0.5, check=check
    )
    lines = format_train_bench(bench).splitlines()
    assert lines[0].endswith("precision no; compiled in 12.3 s (excluded); features cached in 0.5 s (excluded)")
    assert lines[3].endswith("      -         -") and lines[3].startswith("distvit        1000 ")
    assert lines[-1] == (
        "fast path vs fp32 reference (bf16, compiled=True, 3 steps): logits within 1.23% (tolerance 5%), "
        "losses within 0.40% (tolerance 2%), weight updates within 31.0% (tolerance 25%): FAIL"
    )
    passed = format_train_bench(dataclasses.replace(bench, check={**check, "passed": True}))
    assert passed.splitlines()[-1].endswith("(tolerance 25%): PASS")


def test_scaling_against_a_written_reference(tmp_path):
    reference = tmp_path / "one.json"
    write_bench_json(reference, _bench(world_size=1, results=[_measurement("distvit", 500.0, None)]))
    line = scaling_line(_bench(world_size=4, results=[_measurement("distvit", 1800.0, None)]), reference)
    # per process: 1800 / 4 = 450 images/s against 500 / 1: 90 % efficiency
    assert line == (
        f"scaling: 4 process(es) 1800 images/s vs 1 process(es) 500 images/s ({reference}): 3.60x, efficiency 90.0%"
    )
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"world_size": 2, "results": [{"images_per_sec": 1000.0}]}))
    assert scaling_line(_bench(world_size=8, results=[_measurement("distvit", 4400.0, None)]), two).endswith(
        "4.40x, efficiency 110.0%"  # 550 per process against 500
    )


@pytest.mark.parametrize(
    "content, detail",
    [
        (None, "No such file"),
        ("not json", "Expecting value"),
        ('{"world_size": 1}', "'results'"),
        ('{"results": []}', ""),
    ],
)
def test_a_bad_reference_is_a_data_error(tmp_path, content, detail):
    path = tmp_path / "ref.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as caught:
        scaling_line(_bench(results=[_measurement("distvit", 1.0, None)]), path)
    message = str(caught.value)
    assert message.startswith(f"--scaling-reference {path}: not a `distvit bench train --json` result (")
    assert detail in message


def test_a_json_list_as_reference_is_a_data_error(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text("[]")
    with pytest.raises(DataError):
        scaling_line(_bench(results=[_measurement("distvit", 1.0, None)]), path)
