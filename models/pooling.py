"""Generalised mean (GeM) pooling of a feature map, with one exponent for training and one for
extraction (the ISC 2021 and VSC 2022 seeds fix both by flags rather than learning them)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling over H, W: ``mean(x^p)^(1/p)`` (p=1: average pooling)."""
    x = x.float().clamp(min=eps)
    if p == 1.0:
        return x.mean(dim=(-2, -1))
    return x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eval_p: Optional[float] = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eval_p, self.eps = float(p), float(eval_p if eval_p is not None else p), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p if self.training else self.eval_p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eval_p={self.eval_p}"
