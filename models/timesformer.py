"""TimeSformer: a ViT over video with divided space-time attention.

Parameter names and shapes follow the official TimeSformer checkpoints so that the released ``.pyth``
files load key for key.  The layout was checked against facebookresearch/TimeSformer,
``timesformer/models/vit.py`` (``VisionTransformer``, ``Block``, ``Attention``, ``PatchEmbed``, ``Mlp``)
and ``timesformer/models/helpers.py`` (``load_state_dict`` / ``load_pretrained``): the ``.pyth`` file is a
dict whose ``model_state`` holds the ``VisionTransformer`` weights behind a ``model.`` prefix.  The
official base model is ViT-B/16 with ``qkv_bias=True``, ``LayerNorm(eps=1e-6)``, ``drop_path_rate=0.1``.

Token layout (kept from the official code so per-token features mean the same thing): one cls token,
then the patch tokens ordered ``(h w t)``, i.e. patch-major and frame-minor; ``space_only`` instead runs
every frame as its own image and averages the frames at the end.

Loading foreign checkpoints goes through :func:`checkpoint_filter_fn` (timm's habit): prefix removal,
head handling and resizing of the position/time embeddings live in that one visible function.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

logger = logging.getLogger(__name__)

AttentionType = Literal["divided_space_time", "space_only", "joint_space_time"]
AttnImpl = Literal["sdpa", "explicit"]
ATTENTION_TYPES: tuple[str, ...] = ("divided_space_time", "space_only", "joint_space_time")
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "explicit")


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample (the official model uses 0.1)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Transformer feed-forward block; names ``fc1``/``fc2`` match the checkpoint."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    The ``qkv`` output is laid out ``(three heads head_dim)`` as in the official checkpoint.
    ``attn_impl="sdpa"`` uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU);
    ``"explicit"`` materialises ``softmax(QK^T / sqrt(d)) V`` and is the reference the benchmark compares to.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: AttnImpl = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}; pick num_heads dividing it")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_impl: AttnImpl = _check_attn_impl(attn_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        if self.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = F.dropout(attn, p=drop, training=self.training) @ v
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


def _check_attn_impl(attn_impl: str) -> AttnImpl:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r} is not one of {ATTN_IMPLS}")
    return attn_impl  # type: ignore[return-value]


class Block(nn.Module):
    """One transformer block; with divided attention it adds a temporal branch before the spatial one."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attention_type: AttentionType = "divided_space_time",
        attn_impl: AttnImpl = "sdpa",
    ) -> None:
        super().__init__()
        self.attention_type = attention_type
        attn_kw: dict[str, Any] = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, attn_impl=attn_impl)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, **attn_kw)
        if attention_type == "divided_space_time":
            self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.temporal_attn = Attention(dim, num_heads, **attn_kw)
            self.temporal_fc = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.attention_type != "divided_space_time":
            # space_only: x is (b t) (1+n) d; joint: b (1 + n t) d. Either way plain ViT attention.
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))

        t = num_frames
        cls_tok, patches = x[:, :1], x[:, 1:]  # b 1 d, b (n t) d
        batch = x.shape[0]

        # Temporal attention: each patch position attends over its own t frames.
        xt = rearrange(patches, "b (n t) d -> (b n) t d", t=t)
        res_t = self.drop_path(self.temporal_attn(self.temporal_norm1(xt)))
        res_t = rearrange(res_t, "(b n) t d -> b (n t) d", b=batch)
        patches = patches + self.temporal_fc(res_t)

        # Spatial attention: each frame attends over its patches plus a copy of the cls token.
        xs = rearrange(patches, "b (n t) d -> (b t) n d", t=t)
        xs = torch.cat((repeat(cls_tok, "b 1 d -> (b t) 1 d", t=t), xs), dim=1)
        res_s = self.drop_path(self.attn(self.norm1(xs)))
        cls_res = reduce(res_s[:, :1], "(b t) 1 d -> b 1 d", "mean", t=t)  # the cls token averages its frames
        res_s = rearrange(res_s[:, 1:], "(b t) n d -> b (n t) d", b=batch)

        x = torch.cat((cls_tok, patches), dim=1) + torch.cat((cls_res, res_s), dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Per-frame patchify with a strided conv (``patch_embed.proj`` in the checkpoint)."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size={self.img_size} is smaller than patch_size={self.patch_size}")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(b, c, t, h, w) -> ((b t), n, d) and the patch grid (gh, gw) actually produced."""
        x = self.proj(rearrange(x, "b c t h w -> (b t) c h w"))
        grid = (x.shape[-2], x.shape[-1])
        return rearrange(x, "bt d gh gw -> bt (gh gw) d"), grid


class TimeSformer(nn.Module):
    """Video ViT (Bertasius et al. 2021). ``num_classes=0`` returns the cls feature (768-d for base).

    Defaults are the official ViT-B/16, 8 frames, 224 px, divided space-time configuration.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        num_frames: int = 8,
        attention_type: AttentionType = "divided_space_time",
        attn_impl: AttnImpl = "sdpa",
    ) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type={attention_type!r} is not one of {ATTENTION_TYPES}")
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be >= 1")
        self.attention_type: AttentionType = attention_type
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_frames = num_frames

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        if attention_type != "space_only":  # the official space-only model has no time embedding
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
            self.time_drop = nn.Dropout(drop_rate)

        # stochastic depth grows linearly with depth (plain floats: works on the meta device too)
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                attention_type=attention_type,
                attn_impl=attn_impl,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """Same scheme as the reference, so from-scratch runs are comparable with the paper's."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.attention_type == "divided_space_time":
            # The temporal branch starts as a no-op in every block but the first (as in the reference).
            for blk in list(self.blocks)[1:]:
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)

    def no_weight_decay(self) -> set[str]:
        """Embedding parameters that optimizers should exclude from weight decay."""
        names = {"pos_embed", "cls_token"}
        return names | ({"time_embed"} if hasattr(self, "time_embed") else set())

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Switch every attention layer between SDPA and the explicit softmax(QK^T)V (for benchmarks)."""
        impl = _check_attn_impl(attn_impl)
        for m in self.modules():
            if isinstance(m, Attention):
                m.attn_impl = impl

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed token features: (B, 1 + N*T, D), or (B, 1 + N, D) frame-averaged for space_only.

        ``x`` is a clip batch (B, C, T, H, W). Other sizes than the built ones work: the embeddings are
        resized on the fly, as the reference does at inference.
        """
        batch, t = x.shape[0], x.shape[2]
        tokens, grid = self.patch_embed(x)  # (b t) n d
        pos = _resize_pos_embed(self.pos_embed, grid) if grid != self.patch_embed.grid_size else self.pos_embed
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls, tokens), dim=1) + pos)

        if self.attention_type != "space_only":
            cls = x[::t, :1]  # identical across frames before any block; keep one per clip
            patches = rearrange(x[:, 1:], "(b t) n d -> (b n) t d", b=batch)
            time = _resize_time_embed(self.time_embed, t) if t != self.time_embed.shape[1] else self.time_embed
            patches = self.time_drop(patches + time)
            x = torch.cat((cls, rearrange(patches, "(b n) t d -> b (n t) d", b=batch)), dim=1)

        for blk in self.blocks:
            x = blk(x, t)

        if self.attention_type == "space_only":
            x = reduce(x, "(b t) n d -> b n d", "mean", b=batch)  # average the per-frame predictions
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The cls feature (B, D): what the reference feeds its classifier."""
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("model_state", "state_dict", "model")  # official .pyth, timm/Lightning, plain torch.save
_PREFIXES = ("module.", "model.")  # DataParallel, then the official ``vit_base_patch16_224.model`` wrapper
_TEMPORAL_PARTS = (".temporal_norm1.", ".temporal_attn.", ".temporal_fc.")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model (other architecture, depth, width or patch size)."""


def _resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resize (1, 1 + gh*gw, D) position embeddings over the 2D patch grid, keeping the cls slot as is.

    2D interpolation keeps rows and columns apart; the reference's 1D nearest resize over the
    flattened sequence mixes them, which is why this one is used here.
    """
    n = pos_embed.shape[1] - 1
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointMismatchError(
                f"pos_embed has {n} patch slots, not a square grid: pass the source grid explicitly"
            )
        old_grid = (side, side)
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = rearrange(grid.float(), "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    grid = F.interpolate(grid, size=new_grid, mode=mode, **align)
    grid = rearrange(grid, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat((cls, grid), dim=1)


def _resize_time_embed(time_embed: torch.Tensor, num_frames: int, mode: str = "linear") -> torch.Tensor:
    """Resize (1, T, D) time embeddings to ``num_frames`` along time (linear or nearest)."""
    x = rearrange(time_embed.float(), "1 t d -> 1 d t")
    align = {"align_corners": False} if mode == "linear" else {}
    x = F.interpolate(x, size=num_frames, mode=mode, **align)
    return rearrange(x, "1 d t -> 1 t d").to(time_embed.dtype)


def _unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state: Any = checkpoint
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any],
    model: TimeSformer,
    pos_interpolation: str = "bicubic",
    time_interpolation: str = "linear",
) -> dict[str, torch.Tensor]:
    """Turn an official TimeSformer checkpoint (or a raw state dict) into ``model``'s state-dict layout.

    - unwraps ``model_state`` (official ``.pyth``) and strips the ``model.`` / ``module.`` prefixes;
    - keeps ``head.*`` only if the model has a head of the same shape (``num_classes=0`` drops it);
    - drops the temporal weights (and ``time_embed`` for ``space_only``) when the model's
      ``attention_type`` has none, so a divided checkpoint initialises a joint or space-only model, as
      the reference allows;
    - resizes ``pos_embed`` over the 2D patch grid and ``time_embed`` over time when the model's image
      size, patch grid or frame count differ.
    Shape mismatches elsewhere are left for :func:`load_pretrained` to report.
    """
    sd = _unwrap_state_dict(state_dict)
    target = model.state_dict()

    head_keys = [k for k in sd if k.startswith("head.")]
    if head_keys and any(k not in target or target[k].shape != sd[k].shape for k in head_keys):
        for k in head_keys:
            del sd[k]
        logger.info("dropped the checkpoint's classifier head: the model has num_classes=%d", model.num_classes)

    if model.attention_type != "divided_space_time":
        unused = [k for k in sd if any(p in f".{k}" for p in _TEMPORAL_PARTS)]
        if model.attention_type == "space_only" and "time_embed" in sd:
            unused.append("time_embed")
        for k in unused:
            del sd[k]
        if unused:
            logger.info("dropped %d temporal weights unused by attention_type=%s", len(unused), model.attention_type)

    pe = sd.get("pos_embed")
    if pe is not None and pe.ndim == 3 and pe.shape[-1] == model.embed_dim and pe.shape != model.pos_embed.shape:
        sd["pos_embed"] = _resize_pos_embed(pe, model.patch_embed.grid_size, mode=pos_interpolation)
        logger.info("resized pos_embed %s -> %s (%s)", tuple(pe.shape), tuple(sd["pos_embed"].shape), pos_interpolation)

    te = sd.get("time_embed")
    own_te = getattr(model, "time_embed", None)
    if te is not None and own_te is not None and te.ndim == 3 and te.shape[-1] == model.embed_dim:
        if te.shape[1] != own_te.shape[1]:
            sd["time_embed"] = _resize_time_embed(te, own_te.shape[1], mode=time_interpolation)
            logger.info("resized time_embed %s -> %s (%s)", tuple(te.shape), tuple(own_te.shape), time_interpolation)
    return sd


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did, for the job log."""

    path: str
    loaded: int
    head_loaded: bool
    missing: list[str] = field(default_factory=list)  # only keys allowed to stay at init (the head)


def load_pretrained(
    model: TimeSformer,
    path: str | Path,
    *,
    pos_interpolation: str = "bicubic",
    time_interpolation: str = "linear",
    trust_pickle: bool = False,
) -> LoadReport:
    """Load an official ``.pyth`` (or a TimeSformer state dict) into ``model``, strictly on the backbone.

    Every backbone key must be present with the right shape and nothing may be left over; only the
    classifier head may stay at its init (when the checkpoint's head does not fit). Anything else raises
    :class:`CheckpointMismatchError` naming the keys and shapes, because a silently half-loaded backbone
    trains for hours before anyone notices. ``trust_pickle=True`` allows files that need full unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_model {str(path)!r} does not exist; pass an official .pyth path or None")
    checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    sd = checkpoint_filter_fn(checkpoint, model, pos_interpolation, time_interpolation)
    target = model.state_dict()

    bad_shapes = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    if bad_shapes:
        k = bad_shapes[0]
        raise CheckpointMismatchError(
            f"{path}: key {k!r} has shape {tuple(sd[k].shape)} in the checkpoint but {tuple(target[k].shape)} "
            f"in the model ({len(bad_shapes)} mismatched keys in all); the checkpoint is from another "
            f"architecture: match embed_dim/patch_size/depth/num_heads to it, or train from scratch"
        )
    missing = sorted(k for k in target if k not in sd and not k.startswith("head."))
    unexpected = sorted(k for k in sd if k not in target)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{path} does not fit TimeSformer(attention_type={model.attention_type}, depth={len(model.blocks)}, "
            f"embed_dim={model.embed_dim}): missing {len(missing)} keys {missing[:8]}, "
            f"unexpected {len(unexpected)} keys {unexpected[:8]}; is it a TimeSformer checkpoint of this size?"
        )
    model.load_state_dict(sd, strict=False)
    head_missing = sorted(k for k in target if k.startswith("head.") and k not in sd)
    if head_missing:
        logger.warning("%s: classifier head left at init (%s)", path, ", ".join(head_missing))
    logger.info("loaded %d tensors from %s", len(sd), path)
    return LoadReport(
        path=str(path),
        loaded=len(sd),
        head_loaded=any(k.startswith("head.") for k in sd),
        missing=head_missing,
    )
