"""distvit.model.plan_text: the surgery plan as the log prints it, and its warnings."""

from __future__ import annotations

from distvit.model.plan_text import plan_report
from tests.support.models import surgery


def test_plan_report_counts_and_warns(small_dataset, weights):
    model, record = surgery(small_dataset, weights, "surgery.img_size=32", classes=10)
    report = plan_report(model, record, 64)
    assert "grid 2x2, 5 tokens per image" in report and "5,489,482 total" in report
    assert "surgery.patch_size=4 (grid 8x8)" in report
    model, record = surgery(small_dataset, weights, classes=10)
    assert abs(record.flops_per_image / 1e9 - 2.51) < 0.01  # DeiT-Ti at 224: 1.25 GMACs


def test_shrinking_pretrained_patches_warns(small_dataset, weights):
    model, record = surgery(small_dataset, weights, "surgery.img_size=32", "surgery.patch_size=4", classes=10)
    assert "shrinking pretrained patches 16 -> 4 px" in plan_report(model, record, 64)
