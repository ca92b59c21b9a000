"""The metric-learning descriptor network isc and vsc share: ``backbone -> pooling ->
Linear(C, dim, no bias) -> BatchNorm1d -> L2``, unit vectors compared by inner product.

Module names are the seeds' (``backbone.*``, ``fc.weight``, ``bn.*``), so their published weights
load by name. A workflow's network subclasses :class:`DescriptorNet`, builds its backbone and
pooling, and overrides :meth:`DescriptorNet.backbone_features` when the backbone does not return
the tensor the pooling expects.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class DescriptorNet(nn.Module):
    """``x -> L2(BN(fc(pool(backbone_features(x)))))``: ``fc_dim``-d unit vectors."""

    def __init__(self, backbone: nn.Module, in_dim: int, fc_dim: int, pool: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool if pool is not None else nn.Identity()
        self.fc = nn.Linear(in_dim, fc_dim, bias=False)
        self.bn = nn.BatchNorm1d(fc_dim)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.backbone_features(x))
        return F.normalize(self.bn(self.fc(pooled.to(self.fc.weight.dtype))), dim=1)
