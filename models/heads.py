"""Score heads on top of the TimeSformer features.

Both heads predict two numbers, ``[final_score / difficulty / 30, difficulty]``: the execution part
(three judges scoring 0-10 each, normalised to 0-1) and the dive's difficulty. The final score is
decoded as ``out0 * out1 * 30`` (:func:`decode_score`), so the head never has to learn the product.

Names follow the seed's argument table (DeepSports ``train.py``): ``topology`` (hidden sizes),
``dropout`` (one drop probability per layer, applied *before* its linear; the output layer reuses the
last one), ``activation`` (None, ReLU, LeakyReLU, ELU, GELU; tanh and sigmoid are accepted too).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

NUM_OUTPUTS = 2  # [final_score / difficulty / 30, difficulty]
SCORE_SCALE = 30.0  # three judges x 10 points

_ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "none": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def decode_score(out: torch.Tensor) -> torch.Tensor:
    """Final score from head outputs or targets ``[..., 2]``: ``out0 * out1 * 30``."""
    return out[..., 0] * out[..., 1] * SCORE_SCALE


def encode_target(final_score: torch.Tensor | float, difficulty: torch.Tensor | float) -> torch.Tensor:
    """The training target ``[final_score / difficulty / 30, difficulty]`` (inverse of :func:`decode_score`)."""
    fs = torch.as_tensor(final_score, dtype=torch.float32)
    dd = torch.as_tensor(difficulty, dtype=torch.float32)
    return torch.stack((fs / dd / SCORE_SCALE, dd), dim=-1)


def make_activation(name: str | None) -> nn.Module | None:
    """Activation module from a seed-style name (case and ``_`` insensitive: ``LeakyReLU``, ``leaky_relu``)."""
    key = "none" if name is None else str(name).lower().replace("_", "")
    if key not in _ACTIVATIONS:
        allowed = ", ".join(_ACTIVATIONS)
        raise ValueError(f"activation={name!r} is not supported; use one of: {allowed}")
    factory = _ACTIVATIONS[key]
    return factory() if factory is not None else None


def _per_layer_dropout(dropout: float | Sequence[float], n_layers: int) -> list[float]:
    """One drop probability per hidden layer plus one for the output layer (the last value, as the seed)."""
    probs = [float(dropout)] if isinstance(dropout, (int, float)) else [float(p) for p in dropout]
    if len(probs) == 1:
        probs = probs * max(n_layers, 1)
    if len(probs) != max(n_layers, 1):
        raise ValueError(
            f"dropout={list(probs)} has {len(probs)} values but topology has {n_layers} layers; "
            f"give one value per layer or a single value for all"
        )
    if any(not 0.0 <= p < 1.0 for p in probs):
        raise ValueError(f"dropout={probs}: every probability must be in [0, 1)")
    return probs[:n_layers] + [probs[-1]]


class MLPHead(nn.Module):
    """``in_dim -> topology... -> 2`` with ``Dropout -> Linear -> activation`` per hidden layer."""

    def __init__(
        self,
        in_dim: int,
        topology: Sequence[int] = (512, 256),
        dropout: float | Sequence[float] = 0.5,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in topology]
        if any(s < 1 for s in sizes):
            raise ValueError(f"topology={sizes}: every hidden size must be >= 1")
        probs = _per_layer_dropout(dropout, len(sizes))
        layers: list[nn.Module] = []
        last = in_dim
        for size, p in zip(sizes, probs):
            layers += [nn.Dropout(p), nn.Linear(last, size)]
            act = make_activation(activation)
            if act is not None:
                layers.append(act)
            last = size
        layers += [nn.Dropout(probs[-1]), nn.Linear(last, NUM_OUTPUTS)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) cls features -> (B, 2)."""
        return self.layers(features)


class DecoderHead(nn.Module):
    """A transformer decoder whose learned queries cross-attend to the backbone's per-token features.

    The seed ran a 4-layer ``nn.TransformerDecoder`` on the pooled cls vector (so it attended across
    the batch); here the queries read every space-time token instead, which is what a decoder head is for.
    """

    def __init__(
        self,
        embed_dim: int,
        num_layers: int = 4,
        num_heads: int = 8,
        num_queries: int = 1,
        dropout: float = 0.1,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"decoder_heads={num_heads} must divide embed_dim={embed_dim}")
        if num_queries < 1:
            raise ValueError(f"num_queries={num_queries} must be >= 1")
        self.queries = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        layer = nn.TransformerDecoderLayer(
            d_model=embed_dim,
            nhead=num_heads,
            dim_feedforward=int(embed_dim * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,  # pre-norm, like the backbone: stable without warm-up tricks
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=num_layers, norm=nn.LayerNorm(embed_dim))
        self.out = nn.Linear(embed_dim, NUM_OUTPUTS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) token features -> (B, 2)."""
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        return self.out(self.decoder(queries, tokens).mean(dim=1))
