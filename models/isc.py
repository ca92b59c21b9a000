"""ISC 2021 descriptor model: timm backbone -> GeM -> Linear(C, 256, no bias) -> BatchNorm1d -> L2
(:class:`models.descriptor_net.DescriptorNet`), trained with the contrastive loss inside a
cross-batch memory bank (:mod:`models.memory_bank`).

Module names follow the seed's ``ISCNet`` (``backbone.*``, ``fc.weight``, ``bn.*``), so the weights
of its published checkpoints (``{"state_dict": {"module.backbone...": ...}, "args": Namespace}``)
match by name once ``module.`` is stripped (``hpc_jobs.engine.load_init_weights`` does that); those
files also pickle an argparse ``Namespace``, which safe loading refuses, so re-save their
``state_dict`` alone first. GeM's exponent is fixed, not learnt, with one
value for training (``gem_p``) and one for extraction (``gem_eval_p``), as the seed's flags.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .descriptor_net import DescriptorNet
from .pooling import GeM
from .timm_backbone import create_backbone

PAPER_ARCH = "tf_efficientnetv2_m.in21k_ft_in1k"  # the seed's tf_efficientnetv2_m_in21ft1k


class ISCNet(DescriptorNet):
    """Descriptor network: ``x -> L2(BN(fc(GeM(backbone(x)[-1]))))``, ``fc_dim``-d unit vectors."""

    def __init__(self, arch: str, fc_dim: int = 256, p: float = 1.0, eval_p: float = 1.0,
                 pretrained: bool = False, backbone: Optional[nn.Module] = None) -> None:
        backbone = backbone if backbone is not None else create_backbone(arch, pretrained)
        super().__init__(backbone, backbone.feature_info.channels()[-1], fc_dim, pool=GeM(p, eval_p))
        self.arch = arch

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]  # features_only: the last stage's map
