"""distvit.tools.measure: training FLOPs per image as torch's FlopCounterMode counts them, the device's
peak FLOP/s (data sheet or measured), peak memory, and the host-sync count without a GPU."""

from __future__ import annotations

import pytest
import torch

from distvit.tools.measure import count_host_syncs, device_peak_flops, peak_memory, train_flops_per_image


def test_train_flops_of_a_linear_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4, bias=False)
    # forward x @ W^T: 2 x 8 x 4 = 64 per image; backward: the weight gradient (64), and the input
    # gradient (64) only when the input needs one: 3 x 64 = 192 with it, 128 without
    assert train_flops_per_image(layer, torch.randn(5, 8, requires_grad=True)) == 192
    assert train_flops_per_image(layer, torch.randn(5, 8)) == 128
    assert layer.weight.grad is None  # the counting pass leaves no gradients behind


def test_frozen_layers_get_no_weight_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 2, bias=False))
    # forward 64 + 16; backward: second weight 16, its input 16 (the first layer needs it), first weight 64
    assert train_flops_per_image(net, torch.randn(3, 8)) == 80 + 96
    net[0].requires_grad_(False)
    # frozen first layer: only the second layer's weight gradient remains
    assert train_flops_per_image(net, torch.randn(3, 8)) == 80 + 16


def test_peak_flops_measured_on_cpu():
    flops, source = device_peak_flops(torch.device("cpu"), "no")
    assert flops > 1e8 and source == "measured 1024x1024 float32 matmul"
    flops, source = device_peak_flops(torch.device("cpu"), "bf16")
    assert flops > 1e8 and source == "measured 1024x1024 bfloat16 matmul"


@pytest.mark.parametrize(
    "name, fp32, low",
    [
        ("NVIDIA H100 80GB HBM3", 67e12, 989e12),
        ("NVIDIA H100 NVL", 60e12, 835e12),  # the more specific pattern first
        ("NVIDIA H100 PCIe", 51e12, 756e12),
        ("NVIDIA GH200 480GB", 67e12, 989e12),
        ("NVIDIA A100-SXM4-80GB", 19.5e12, 312e12),
        ("NVIDIA L40S", 91.6e12, 362e12),
        ("NVIDIA L40", 90.5e12, 181e12),
        ("NVIDIA L4", 30.3e12, 121e12),
    ],
)
def test_known_gpus_use_the_data_sheet(monkeypatch, name, fp32, low):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert device_peak_flops(cuda, "no") == (fp32, f"{name} data sheet (fp32, dense)")
    assert device_peak_flops(cuda, "bf16") == (low, f"{name} data sheet (bf16, dense)")
    assert device_peak_flops(cuda, "fp16") == (low, f"{name} data sheet (bf16, dense)")


def _high_water_mark() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_peak_memory_on_cpu_is_the_process_peak_rss():
    peak, kind = peak_memory(torch.device("cpu"))
    mark = _high_water_mark()
    assert isinstance(peak, int) and kind == "process peak RSS (whole run)"
    # bytes, not kilobytes: a unit slip is a factor of 1024 (getrusage and /proc may differ by a few pages,
    # and after many tests by more, as the kernel accounts them at different times)
    assert mark / 2 <= peak <= mark * 2, (peak, mark)


def test_host_syncs_without_a_gpu_run_the_steps_and_count_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    assert count_host_syncs(lambda: ran.append(1) or 3) is None
    assert ran == [1]


def test_host_syncs_are_counted_per_step_with_where_they_were_called(monkeypatch):
    """On a GPU: CUDA's sync-debug warnings during the steps, per step, and each one's file:line."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def steps():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)
        return 4

    sites = []
    assert count_host_syncs(steps, sites) == 0.5
    assert modes == ["warn", "default"]
    assert len(sites) == 2 and all(site.startswith(__file__ + ":") for site in sites)
