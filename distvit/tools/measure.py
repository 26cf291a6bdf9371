"""What the training benchmark measures besides time: the device's peak FLOP/s, training FLOPs per image,
peak memory, and host synchronisations inside a step."""

from __future__ import annotations

import re
import resource
import time
import warnings

import torch

from distvit.engine.timing import synchronize

# Dense peak FLOP/s from the vendors' data sheets: (device name pattern, bf16/fp16 tensor core, fp32
# non-tensor), first match wins.
DEVICE_PEAKS = (
    (r"H100 NVL", 835e12, 60e12),
    (r"H100 PCIe", 756e12, 51e12),
    (r"\bH100\b", 989e12, 67e12),
    (r"\b(GH|H)200\b", 989e12, 67e12),
    (r"\bA100\b", 312e12, 19.5e12),
    (r"\bL40S\b", 362e12, 91.6e12),
    (r"\bL40\b", 181e12, 90.5e12),
    (r"\bL4\b", 121e12, 30.3e12),
)


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """The device's peak FLOP/s for the compute dtype: the data sheet's where known, else measured on a
    large matmul (CPUs, unknown GPUs)."""
    low_precision = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, tensor_core, fp32 in DEVICE_PEAKS:
            if re.search(pattern, name):
                return (
                    tensor_core if low_precision else fp32
                ), f"{name} data sheet ({'bf16' if low_precision else 'fp32'}, dense)"
    dtype = torch.bfloat16 if low_precision else torch.float32
    size = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best, f"measured {size}x{size} {str(dtype).removeprefix('torch.')} matmul"


def train_flops_per_image(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """FLOPs of one training forward+backward per image (matmuls, convolutions, attention), counted by
    torch's FlopCounterMode; frozen parameters get no weight gradients, so they cost less."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        output = model(inputs)
        sum(o.float().sum() for o in (output if isinstance(output, tuple) else (output,))).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / inputs.shape[0]


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU memory allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (whole run)"


def count_host_syncs(run_steps, sites: list[str] | None = None) -> float | None:
    """Run the callable's steps in CUDA's sync-debug mode; host synchronisations per step (None when
    there is no GPU or no step was checked). `sites` gets where each one was called from (file:line)."""
    if not torch.cuda.is_available():
        run_steps()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            steps = run_steps()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    if sites is not None:
        sites.extend(f"{w.filename}:{w.lineno}" for w in syncs)
    return len(syncs) / steps if steps else None
