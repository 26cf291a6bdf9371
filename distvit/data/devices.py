"""Moving small tensors to the training device without stalling the host."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to `device` without making the host wait: a plain copy from pageable
    memory synchronises with the GPU stream, a pinned non-blocking one does not (the pinned buffer is
    kept alive by PyTorch's host allocator until the copy is done)."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
