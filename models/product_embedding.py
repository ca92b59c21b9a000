"""The product embedding network of the Visual Product Recognition 2023 workflow:
``timm backbone (its own pooled features) -> Linear(C, dim) -> BN -> L2`` (the shared
:class:`models.descriptor_net.DescriptorNet`), plus, in the ArcFace phases, a sub-centre ArcFace
head (``arcface.weight``).

The XBM phases build the same network without the head; starting them from an ArcFace phase's
checkpoint loads non-strictly and drops ``arcface.*`` (:func:`drop_arcface_head`, the task's
``filter_init_state``, which says what it dropped).

:func:`stage_param_groups` reproduces the seed's optimiser: the head (projection + ArcFace) at its
own learning rate and weight decay, the backbone split into ``len(backbone_lrs)`` consecutive
blocks (earliest first) at increasing learning rates (the seed: 1.25e-6, 2.5e-6, 5e-6, 1e-5).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .descriptor_net import DescriptorNet
from .subcenter_arcface import SubCenterArcFace
from .timm_backbone import create_backbone

HEAD_PREFIX = "arcface."


class ProductNet(DescriptorNet):
    """``forward(x)``: unit embeddings; ``forward(x, with_head=True)``: (embeddings, class cosines)."""

    def __init__(self, arch: str, dim: int = 512, num_classes: int = 0, subcenters: int = 3,
                 pretrained: bool = False, img_size: Optional[int] = None) -> None:
        kwargs = {"img_size": img_size} if img_size and _takes_img_size(arch) else {}
        backbone = create_backbone(arch, pretrained=pretrained, features_only=False, **kwargs)
        # the width of what the backbone returns with num_classes=0 (MobileNetV3: after its conv head)
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        super().__init__(backbone, width, dim)
        self.arch = arch
        self.arcface = SubCenterArcFace(dim, num_classes, subcenters) if num_classes else None

    def forward(self, x: torch.Tensor, with_head: bool = False):
        embeddings = super().forward(x)
        if not with_head:
            return embeddings
        if self.arcface is None:
            raise RuntimeError("this ProductNet has no ArcFace head (an XBM phase's network)")
        return embeddings, self.arcface(embeddings)


def _takes_img_size(arch: str) -> bool:
    """ViTs fix their position embeddings to an input size: tell them the phase's."""
    name = arch.split(".")[0]
    return name.startswith(("vit_", "deit_", "eva", "beit"))


def drop_arcface_head(state: Dict[str, torch.Tensor], model: nn.Module) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The checkpoint's tensors without the ArcFace head when ``model`` has none (an XBM phase
    starting from an ArcFace phase), and the names dropped."""
    if getattr(model, "arcface", None) is not None:
        return state, []
    dropped = [k for k in state if k.startswith(HEAD_PREFIX)]
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}, dropped


def stage_param_groups(model: nn.Module, backbone_lrs: Sequence[float], backbone_wd: float, head_lr: float,
                       head_wd: float) -> list:
    """AdamW groups: the backbone in ``len(backbone_lrs)`` consecutive blocks of its parameters
    (registration order: stem first), block i at ``backbone_lrs[i]``; everything else (projection,
    BN, ArcFace) at ``head_lr``. Biases and norms carry no weight decay."""
    backbone = [(n, p) for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    head = [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = []

    def add(params: List[Tuple[str, nn.Parameter]], lr: float, wd: float) -> None:
        decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in params if not (p.ndim > 1 and not n.endswith(".bias"))]
        for group, w in ((decay, wd), (no_decay, 0.0)):
            if group:
                groups.append({"params": group, "lr": float(lr), "weight_decay": float(w)})

    blocks = max(1, len(backbone_lrs))
    for i, lr in enumerate(backbone_lrs):
        lo, hi = len(backbone) * i // blocks, len(backbone) * (i + 1) // blocks
        add(backbone[lo:hi], lr, backbone_wd)
    add(head, head_lr, head_wd)
    return groups
