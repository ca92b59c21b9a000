"""VSC 2022 frame descriptor model: a timm ViT (the seed's ``vit_base_r50_s16_224_in21k``, a ViT-B
with a ResNet-50 stem) -> its class token -> Linear(768, 512, no bias) -> BatchNorm1d -> L2
(:class:`models.descriptor_net.DescriptorNet`), trained like isc's with the contrastive loss in a
cross-batch memory.

The ViT is built for one input size: its absolute position embedding has one entry per patch of
that grid. The seed's chain grows the input (224 -> 384 -> 416 -> 448 px) and starts every stage
from the last one's weights, so :func:`checkpoint_filter_fn` (timm's habit: the foreign-weights
adapter beside the model) resamples the embedding to the new grid, bilinearly, and says so.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from .descriptor_net import DescriptorNet
from .timm_backbone import create_backbone

PAPER_ARCH = "vit_base_r50_s16_224.orig_in21k"  # the seed's vit_base_r50_s16_224_in21k
POS_EMBED_KEY = "backbone.pos_embed"
HEAD_PREFIXES = ("fc.", "bn.")  # the seed's head: lr x5, wd x10


class VSCNet(DescriptorNet):
    """``x -> L2(BN(fc(vit(x)[cls])))`` for ``input_size`` x ``input_size`` images; ``depth`` and
    ``patch_size`` override the ViT's blocks and patch size (small presets)."""

    def __init__(self, arch: str, input_size: int, fc_dim: int = 512, pretrained: bool = False,
                 depth: Optional[int] = None, patch_size: Optional[int] = None) -> None:
        kwargs: Dict[str, Any] = {"img_size": int(input_size)}
        if depth is not None:
            kwargs["depth"] = int(depth)
        if patch_size is not None:
            kwargs["patch_size"] = int(patch_size)
        backbone = create_backbone(arch, pretrained, features_only=False, **kwargs)
        if not hasattr(backbone, "pos_embed"):
            raise ValueError(f"{arch} has no absolute position embedding: vsc needs a timm ViT (e.g. {PAPER_ARCH})")
        super().__init__(backbone, backbone.num_features, fc_dim)
        self.arch, self.input_size = arch, int(input_size)

    @property
    def grid_size(self) -> tuple:
        return tuple(self.backbone.patch_embed.grid_size)


def _grid_of(tokens: int) -> tuple:
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"a position embedding of {tokens} patch tokens is not a square grid")
    return side, side


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module,
                         log: Optional[Callable[[str], None]] = print) -> Dict[str, torch.Tensor]:
    """Adapt weights of a :class:`VSCNet` trained at another input size to ``model``: the ViT's
    absolute position embedding is resampled (bilinear) from the checkpoint's patch grid to the
    model's, the class token's entry kept as is. ``log`` gets one line when it resizes."""
    own = model.state_dict()
    old = state_dict.get(POS_EMBED_KEY)
    if old is None or POS_EMBED_KEY not in own or old.shape == own[POS_EMBED_KEY].shape:
        return state_dict
    from timm.layers import resample_abs_pos_embed

    backbone = model.backbone
    prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
    old_grid = _grid_of(old.shape[1] - prefix)
    new_grid = tuple(backbone.patch_embed.grid_size)
    resized = resample_abs_pos_embed(old.float(), new_size=list(new_grid), old_size=list(old_grid),
                                     num_prefix_tokens=prefix, interpolation="bilinear", antialias=False)
    if log is not None:
        log(f"pos_embed resized: {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} patch grid "
            f"(bilinear; {prefix} class token kept), {tuple(old.shape)} -> {tuple(resized.shape)}")
    return {**state_dict, POS_EMBED_KEY: resized.to(old.dtype)}
