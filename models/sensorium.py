"""DwiseNeuro: the Sensorium 2023 winner's network (core -> cortex -> per-mouse readouts).

Input ``(B, 5, T, H, W)``: the video frame stacked with four constant planes (behaviour: pupil
dilation and running speed; pupil centre x, y). Output ``(B, sum(neurons), T)``: the responses
of every mouse's neurons at each input frame, the mice one after the other (``mouse_slices``).

- core: a stem then inverted-residual blocks with *factorized* depthwise convolutions (spatial
  ``1 x k x k``, then temporal ``kt x 1 x 1``: (2+1)D), squeeze-excite and drop-path;
- cortex: the core's map pooled to ``cortex_pool`` and flattened into channels, then grouped
  1D convolutions (kernel 1) over time with a channel shuffle between them;
- readouts: one 1D convolution per mouse to its neurons, Softplus (``softplus_beta``) so rates
  are positive, as the Poisson loss wants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch
from torch import nn

from models.squeeze_excite import SqueezeExcite
from models.timesformer import DropPath


@dataclass
class DwiseNeuroConfig:
    readout_outputs: Sequence[int]             # neurons per mouse
    in_channels: int = 5
    core_features: Sequence[int] = (64, 64, 64, 64, 128, 128, 128, 256, 256)
    spatial_strides: Sequence[int] = (2, 1, 1, 1, 2, 1, 1, 2, 1)
    spatial_kernel: int = 3
    temporal_kernel: int = 5
    expansion_ratio: int = 6
    se_reduce_ratio: int = 32
    cortex_features: Sequence[int] = (1024, 2048, 4096)
    cortex_pool: Tuple[int, int] = (8, 8)      # spatial size of the core map flattened into the cortex
    groups: int = 2
    softplus_beta: float = 0.07
    drop_rate: float = 0.4
    drop_path_rate: float = 0.1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.core_features) != len(self.spatial_strides):
            raise ValueError(f"core_features has {len(self.core_features)} blocks but spatial_strides has "
                             f"{len(self.spatial_strides)}: give one stride per block")
        for width in self.cortex_features:
            if width % self.groups:
                raise ValueError(f"cortex feature width {width} is not a multiple of groups={self.groups}")


def _bn_act(channels: int, dims: int = 3, act: bool = True) -> nn.Sequential:
    bn = nn.BatchNorm3d(channels) if dims == 3 else nn.BatchNorm1d(channels)
    return nn.Sequential(bn, nn.SiLU(inplace=True)) if act else nn.Sequential(bn)


class DepthwiseSpatial(nn.Module):
    """Depthwise ``1 x k x k`` convolution of a (B, C, T, H, W) map, run as a 2D convolution over
    the B*T frames (the same operation as ``Conv3d(groups=C)``; 2-3x faster on CPUs)."""

    def __init__(self, channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, stride=stride, padding=kernel // 2, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.conv(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, *y.shape[-2:]).transpose(1, 2)


class DepthwiseTemporal(nn.Module):
    """Depthwise ``kt x 1 x 1`` convolution of a (B, C, T, H, W) map, as a 1D convolution over time."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.conv(x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t))
        return y.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)


class InvertedResidual3d(nn.Module):
    """1x1x1 expand -> depthwise spatial (1,k,k) -> depthwise temporal (kt,1,1) -> SE -> 1x1x1
    project, plus the shortcut (pooled and projected when the shape changes), drop-path on the branch."""

    def __init__(self, in_features: int, out_features: int, spatial_stride: int = 1, spatial_kernel: int = 3,
                 temporal_kernel: int = 5, expansion_ratio: int = 6, se_reduce_ratio: int = 32,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        mid = in_features * expansion_ratio
        s = spatial_stride
        self.expand = nn.Sequential(nn.Conv3d(in_features, mid, 1, bias=False), *_bn_act(mid))
        self.spatial = nn.Sequential(DepthwiseSpatial(mid, spatial_kernel, s), *_bn_act(mid))
        self.temporal = nn.Sequential(DepthwiseTemporal(mid, temporal_kernel), *_bn_act(mid))
        self.se = SqueezeExcite(mid, se_reduce_ratio)
        self.project = nn.Sequential(nn.Conv3d(mid, out_features, 1, bias=False), *_bn_act(out_features, act=False))
        self.drop_path = DropPath(drop_path)
        if in_features == out_features and s == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.AvgPool3d((1, s, s), stride=(1, s, s), ceil_mode=True) if s > 1 else nn.Identity(),
                nn.Conv3d(in_features, out_features, 1, bias=False), *_bn_act(out_features, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.project(self.se(self.temporal(self.spatial(self.expand(x)))))
        return self.shortcut(x) + self.drop_path(branch)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        return x.view(b, self.groups, c // self.groups, t).transpose(1, 2).reshape(b, c, t)


class Cortex(nn.Module):
    """Grouped 1D convolutions (kernel 1) over time with channel shuffles: (B, C_in, T) -> (B, C_out, T)."""

    def __init__(self, in_features: int, features: Sequence[int], groups: int) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        prev = in_features
        for i, width in enumerate(features):
            g = groups if prev % groups == 0 else 1
            layers += [nn.Conv1d(prev, width, 1, groups=g, bias=False), *_bn_act(width, dims=1)]
            if i + 1 < len(features):
                layers.append(ChannelShuffle(groups))
            prev = width
        self.layers = nn.Sequential(*layers)
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DwiseNeuro(nn.Module):
    def __init__(self, cfg: DwiseNeuroConfig) -> None:
        super().__init__()
        self.cfg = cfg
        first = cfg.core_features[0]
        self.stem = nn.Sequential(nn.Conv3d(cfg.in_channels, first, (1, 3, 3), padding=(0, 1, 1), bias=False),
                                  *_bn_act(first))
        blocks, prev, n = [], first, len(cfg.core_features)
        for i, (width, stride) in enumerate(zip(cfg.core_features, cfg.spatial_strides)):
            rate = cfg.drop_path_rate * i / max(1, n - 1)  # deeper blocks are dropped more often
            blocks.append(InvertedResidual3d(prev, width, stride, cfg.spatial_kernel, cfg.temporal_kernel,
                                             cfg.expansion_ratio, cfg.se_reduce_ratio, rate))
            prev = width
        self.core = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d((None, *cfg.cortex_pool))
        self.cortex = Cortex(prev * cfg.cortex_pool[0] * cfg.cortex_pool[1], cfg.cortex_features, cfg.groups)
        self.readouts = nn.ModuleList(
            nn.Sequential(nn.Dropout1d(cfg.drop_rate) if cfg.drop_rate else nn.Identity(),
                          nn.Conv1d(self.cortex.out_features, neurons, 1))
            for neurons in cfg.readout_outputs)
        self.gate = nn.Softplus(beta=cfg.softplus_beta)
        self._init_weights()

    @property
    def mouse_slices(self) -> List[slice]:
        out, start = [], 0
        for neurons in self.cfg.readout_outputs:
            out.append(slice(start, start + neurons))
            start += neurons
        return out

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 5, T, H, W) -> the cortex's (B, C, T)."""
        x = self.core(self.stem(x))
        x = self.pool(x)                                  # (B, C, T, h, w)
        b, c, t, h, w = x.shape
        x = x.permute(0, 1, 3, 4, 2).reshape(b, c * h * w, t)
        return self.cortex(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        return torch.cat([self.gate(readout(feats)) for readout in self.readouts], dim=1)


def build_model(readout_outputs: Sequence[int], **options) -> DwiseNeuro:
    return DwiseNeuro(DwiseNeuroConfig(readout_outputs=tuple(readout_outputs), **options))


# -- the loss ---------------------------------------------------------------------------------------
def poisson_terms(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Poisson negative log-likelihood without the constant log(target!) term, elementwise:
    ``prediction - target * log(prediction + eps)`` (torch's ``poisson_nll_loss(log_input=False)``)."""
    return prediction - target * torch.log(prediction + eps)


def mice_poisson_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                      mouse_slices: Sequence[slice], eps: float = 1e-8) -> torch.Tensor:
    """The weighted mean over (sample, mouse) of each mouse's mean Poisson loss over its neurons
    and frames. ``weights`` (B, mice): 1 where the sample is that mouse's (0 elsewhere), mixed by
    CutMix, and the teacher's share where distillation filled the other mice's targets."""
    per_mouse = torch.stack([poisson_terms(prediction[:, sl].float(), target[:, sl].float(), eps).mean(dim=(1, 2))
                             for sl in mouse_slices], dim=1)  # (B, mice)
    weights = weights.float()
    return (per_mouse * weights).sum() / weights.sum().clamp_min(1e-12)


def distillation_weights(weights: torch.Tensor, ratio: float) -> torch.Tensor:
    """Weights of the teacher-filled targets: every (sample, mouse) entry the sample does not come
    from gets the same weight ``w``, chosen so that those entries make up ``ratio`` of the total
    weight of the batch: ``w * n_teacher = ratio * (own + w * n_teacher)``. Entries of the
    sample's own mouse keep theirs."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"distill.ratio={ratio} must lie in [0, 1)")
    teacher = weights <= 0
    n_teacher = int(teacher.sum())
    if n_teacher == 0 or ratio == 0.0:
        return weights.clone()
    own = float(weights.clamp_min(0).sum())
    w = ratio * own / ((1.0 - ratio) * n_teacher)
    return torch.where(teacher, torch.full_like(weights, w, dtype=torch.float32), weights.float())


def fill_with_teacher(target: torch.Tensor, weights: torch.Tensor, teacher_prediction: torch.Tensor,
                      mouse_slices: Sequence[slice], ratio: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distillation targets: where a sample has no responses of a mouse (weight 0), the teacher's
    prediction for that mouse fills them; the teacher entries weigh ``ratio`` of the loss."""
    filled = target.clone()
    for m, sl in enumerate(mouse_slices):
        missing = weights[:, m] <= 0
        if missing.any():
            filled[missing, sl] = teacher_prediction[missing, sl].to(filled.dtype)
    return filled, distillation_weights(weights, ratio)
