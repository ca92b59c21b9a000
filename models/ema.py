"""Exponential moving average of a model's weights (parameters and buffers).

``ModelEma(model, decay)`` keeps a frozen copy; ``update(model)`` after each optimizer step moves
it toward the live weights. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n``
updates, so a short run (or a model started from other weights) is not dominated by its
initial values. ``state_dict()`` holds the copy and ``n``: put it in the training task's state so
checkpoints and resume carry it.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must lie in [0, 1)")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        live = model.state_dict()
        for name, value in self.module.state_dict().items():
            source = live[name].detach()
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(source.to(value.dtype), alpha=1.0 - decay)
            else:  # integer buffers (BatchNorm's num_batches_tracked): copy
                value.copy_(source)
        self.updates += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
