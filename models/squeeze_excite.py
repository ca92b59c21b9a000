"""Squeeze-and-excitation for feature maps of any dimension (1D, 2D, 3D).

A channel gate computed from the mean over every non-channel axis: ``x * sigmoid(W2 act(W1 mean(x)))``.
Written with linear layers so one class serves ``(B, C, L)``, ``(B, C, H, W)`` and ``(B, C, T, H, W)``.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018). ``reduce_ratio``: bottleneck width = channels // ratio (>= 1)."""

    def __init__(self, channels: int, reduce_ratio: int = 16, act_layer: type = nn.SiLU) -> None:
        super().__init__()
        hidden = max(1, channels // reduce_ratio)
        self.reduce = nn.Linear(channels, hidden)
        self.act = act_layer()
        self.expand = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.flatten(2).mean(-1)  # (B, C)
        weights = self.gate(self.expand(self.act(self.reduce(squeezed))))
        return x * weights.view(*weights.shape, *([1] * (x.ndim - 2)))
