"""The diving score model: TimeSformer features -> MLP or decoder head -> ``[score/diff/30, diff]``.

:func:`build_diving_model` takes the seed's config names (``attention_type``, ``patch_size``,
``embed_dim``, ``frame_num``, ``spatial_size``, ``dropout``, ``activation``, ``topology``,
``use_decoder``, ``freeze``, ``pretrained_model``) plus a few this code adds (``depth``, ``num_heads``,
``attn_impl``, ``drop_path_rate``, ``decoder_layers``, ``decoder_heads``, ``decoder_queries``,
``decoder_dropout``). Keys it does not know (batch_size, learning_rate...) are ignored, so the whole
run config can be passed as is.

Unlike the seed, the backbone has no classifier: the seed built TimeSformer with
``num_classes=embed_dim`` (a random 768x768 linear on the cls feature) and then the MLP; here the MLP
reads the cls feature directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .heads import DecoderHead, MLPHead, decode_score, make_activation
from .timesformer import ATTENTION_TYPES, ATTN_IMPLS, LoadReport, TimeSformer, load_pretrained

__all__ = ["DivingModelConfig", "DivingScoreModel", "build_diving_model", "decode_score"]

logger = logging.getLogger(__name__)

_NO_CHECKPOINT = {"", "none", "scratch"}  # the seed's spelling for "train from scratch"


@dataclass
class DivingModelConfig:
    """Model part of the diving config; defaults are the seed's (ViT-B/16, 8 frames, 224 px)."""

    attention_type: str = "divided_space_time"
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    frame_num: int = 8
    spatial_size: int = 224
    dropout: float | list[float] = field(default_factory=lambda: [0.5, 0.5])
    activation: str | None = None
    topology: list[int] = field(default_factory=lambda: [512, 256])
    use_decoder: bool = False
    freeze: bool = False
    pretrained_model: str | None = None
    attn_impl: str = "sdpa"
    drop_path_rate: float = 0.1
    decoder_layers: int = 4
    decoder_heads: int = 8
    decoder_queries: int = 1
    decoder_dropout: float = 0.1

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "DivingModelConfig":
        """Pick the known keys out of a run config and normalise the seed's spellings."""
        known = {f for f in cls.__dataclass_fields__}
        conf = cls(**{k: v for k, v in cfg.items() if k in known})
        conf.attention_type = str(conf.attention_type).lower()
        if conf.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type={conf.attention_type!r} is not one of {ATTENTION_TYPES}")
        if conf.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={conf.attn_impl!r} is not one of {ATTN_IMPLS}")
        if isinstance(conf.activation, str) and conf.activation.lower() == "none":
            conf.activation = None
        make_activation(conf.activation)  # fail at build time, not in the first forward
        pm = conf.pretrained_model
        conf.pretrained_model = None if pm is None or str(pm).strip().lower() in _NO_CHECKPOINT else str(pm)
        return conf


class DivingScoreModel(nn.Module):
    """Clip (B, 3, T, H, W) -> (B, 2) = ``[final_score / difficulty / 30, difficulty]``.

    ``freeze=True`` turns gradients off in the backbone and keeps it in eval mode (no stochastic depth
    or dropout noise in features nobody trains); only the head learns.
    """

    def __init__(self, backbone: TimeSformer, head: nn.Module, use_decoder: bool, freeze: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.use_decoder = use_decoder
        self.frozen = freeze
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "DivingScoreModel":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if self.use_decoder:
            return self.head(self.backbone.forward_tokens(clips))
        return self.head(self.backbone.forward_features(clips))

    @torch.no_grad()
    def predict_score(self, clips: torch.Tensor) -> torch.Tensor:
        """Decoded final scores (B,), for evaluation."""
        return decode_score(self(clips))


def build_diving_model(cfg: Mapping[str, Any] | DivingModelConfig) -> DivingScoreModel:
    """Build the score model from a seed-style config dict (or a :class:`DivingModelConfig`)."""
    conf = cfg if isinstance(cfg, DivingModelConfig) else DivingModelConfig.from_dict(cfg)
    backbone = TimeSformer(
        img_size=conf.spatial_size,
        patch_size=conf.patch_size,
        num_classes=0,
        embed_dim=conf.embed_dim,
        depth=conf.depth,
        num_heads=conf.num_heads,
        drop_path_rate=conf.drop_path_rate,
        num_frames=conf.frame_num,
        attention_type=conf.attention_type,  # type: ignore[arg-type]
        attn_impl=conf.attn_impl,  # type: ignore[arg-type]
    )
    if conf.pretrained_model is not None:
        report: LoadReport = load_pretrained(backbone, conf.pretrained_model)
        logger.info("backbone initialised from %s (%d tensors)", report.path, report.loaded)

    head: nn.Module
    if conf.use_decoder:
        head = DecoderHead(
            conf.embed_dim,
            num_layers=conf.decoder_layers,
            num_heads=conf.decoder_heads,
            num_queries=conf.decoder_queries,
            dropout=conf.decoder_dropout,
        )
    else:
        dropout: float | Sequence[float] = conf.dropout
        head = MLPHead(conf.embed_dim, conf.topology, dropout, conf.activation)
    return DivingScoreModel(backbone, head, use_decoder=conf.use_decoder, freeze=conf.freeze)
