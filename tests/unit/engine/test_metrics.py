"""distvit.engine.metrics: logged training lines (loss reduced only when written) and the sample trace."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator

from distvit.config import load_config
from distvit.data.plan import EpochPlan
from distvit.engine.metrics import MetricsMeter, SampleTrace
from distvit.engine.state import TrainState
from distvit.run.tracking import RunTracker, read_metrics


def test_lines_every_log_every_steps_and_at_epoch_end(small_dataset, tmp_path):
    accelerator = Accelerator(cpu=True)
    cfg = load_config(None, [f"data.path={small_dataset}", "tracking.backend=none"])
    tracker = RunTracker(cfg.tracking, accelerator=accelerator, run_dir=tmp_path, class_names=[])
    meter = MetricsMeter(log_every=2, accelerator=accelerator, tracker=tracker)
    state = TrainState()
    waited = list(meter.timed([1, 2, 3]))
    assert waited == [1, 2, 3] and meter.wait >= 0
    meter.add(torch.tensor(6.0), 3)
    state.step = 1
    assert meter.log_if_due(state, 0.1, last_of_epoch=False, extra={}) is None
    meter.add(torch.tensor(2.0), 1)
    state.step = 2
    assert meter.log_if_due(state, 0.1, last_of_epoch=False, extra={"grad_norm": 1.5}) == 2.0  # 8 / 4 images
    meter.add(torch.tensor(1.0), 2)
    state.step = 3
    assert meter.log_if_due(state, 0.05, last_of_epoch=True, extra={}) == 0.5
    tracker.finish()
    lines = read_metrics(tmp_path)
    assert [(r["step"], r["loss"], r["lr"]) for r in lines] == [(2, 2.0, 0.1), (3, 0.5, 0.05)]
    assert lines[0]["grad_norm"] == 1.5 and lines[0]["epoch"] == 1 and 0 <= lines[0]["data_wait_fraction"] <= 1
    assert meter.images_seen == 6 and meter.images_per_sec() == 6 / meter.train_seconds


def test_sample_trace_writes_the_valid_indices(tmp_path):
    plan = EpochPlan(torch.arange(5), global_batch=4, world_size=1, rank=0)
    trace = SampleTrace(tmp_path, rank=0, enabled=True)
    for step, batch in enumerate(plan.batches(), start=1):
        trace.write(1, step, batch)
    trace.close()
    lines = [json.loads(line) for line in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 1, "step": 1, "ids": [0, 1, 2, 3]}, {"epoch": 1, "step": 2, "ids": [4]}]
    SampleTrace(tmp_path / "off", rank=0, enabled=False).close()
    assert not (tmp_path / "off").exists()
