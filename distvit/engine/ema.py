"""Exponential moving average of the model's weights, with a decay sized to the run.

DeiT's 0.99996 averages over ~25k steps: longer than most fine-tunes, so the EMA would still be mostly
the pretrained weights at the end (field notes: a short transfer fell from 70% to 25% with it). Here
the default decay gives a time constant of `horizon` x the run's optimizer steps.

Not timm's `ModelEmaV3`: its decay is fixed or warmed up, not sized to the run, and it averages frozen
tensors too (ours leaves them, they cannot change).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from distvit.config import EmaConfig


def uses_ema(cfg: EmaConfig) -> bool:
    """ema.enabled: the run keeps an EMA (a resume checks that its checkpoint has one, or has none)."""
    return cfg.enabled


def build_ema(model: torch.nn.Module, cfg: EmaConfig, total_steps: int) -> ModelEma | None:
    """The EMA of `model` the ema section asks for (None: ema.enabled is off), its decay sized to the run."""
    if not uses_ema(cfg):
        return None
    return ModelEma(model, decay_for_run(cfg, total_steps), cfg.warmup)


def decay_for_run(cfg: EmaConfig, total_steps: int) -> float:
    """ema.decay if set, else 1 - 1 / (horizon x total_steps): the EMA averages the run's last stretch."""
    if cfg.decay is not None:
        return cfg.decay
    return 1.0 - 1.0 / max(1.0, cfg.horizon * total_steps)


class ModelEma:
    """An fp32 copy of the model updated after every optimizer step. Every rank keeps its own copy of
    identical weights (DDP keeps the models equal), so the EMA can be evaluated on all ranks."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        # Only trainable tensors change; frozen ones stay equal to the model's without work.
        self._pairs = [
            (name, ema_param)
            for (name, param), ema_param in zip(model.named_parameters(), self.module.parameters())
            if param.requires_grad
        ]

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards `model` (the unwrapped training model)."""
        source = dict(model.named_parameters())
        ema_tensors = [ema for _, ema in self._pairs]
        model_tensors = [source[name].detach() for name, _ in self._pairs]
        torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - self.current_decay())
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
