"""timm networks as descriptor backbones: creation with a readable error for unknown names, and
the normalisation statistics their pretrained weights expect."""

from __future__ import annotations

from typing import Any, Tuple

import torch.nn as nn


def create_backbone(arch: str, pretrained: bool = False, features_only: bool = True, **kwargs: Any) -> nn.Module:
    """The timm network ``arch``: with ``features_only`` its last stage's feature map (a list of one
    tensor, for a pooling layer to reduce); otherwise the network's own pooled features
    (``num_classes=0``: a ViT's class token). ``kwargs`` go to ``timm.create_model`` (``img_size``...)."""
    import timm

    if features_only:
        kwargs = {"features_only": True, "out_indices": (-1,), **kwargs}
    else:
        kwargs = {"num_classes": 0, **kwargs}
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"timm has no model named {arch!r} (timm.list_models('*{arch.split('.')[0][:8]}*') "
                             "lists close names)") from None
        raise


def backbone_norm(arch: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) the backbone's pretrained weights expect (ImageNet's when unknown)."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - an unknown tag: fall back to ImageNet statistics
        cfg = None
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)
