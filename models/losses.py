"""Diving loss: ``loss_mse_weight * MSE - loss_spcoef_weight * soft Spearman``.

MSE is taken on the head's two outputs against the encoded targets
(``[final_score / difficulty / 30, difficulty]``, as the seed did); the Spearman term is taken on the
decoded final scores, the quantity the benchmark ranks. The soft Spearman uses torchsort's
differentiable ``soft_rank`` (Blondel et al. 2020); torchsort is a hard dependency.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchsort

from .heads import decode_score

logger = logging.getLogger(__name__)
_warned_cpu_fallback = False


def _soft_rank(values: torch.Tensor, regularization_strength: float) -> torch.Tensor:
    """torchsort.soft_rank on a (1, n) float32 tensor, on the CPU if torchsort was built without CUDA."""
    global _warned_cpu_fallback
    try:
        return torchsort.soft_rank(values, regularization_strength=regularization_strength)
    except ImportError:  # torchsort raises this when its CUDA extension was not compiled
        if values.device.type == "cpu":
            raise
        if not _warned_cpu_fallback:
            logger.warning("torchsort has no CUDA extension here: ranking on the CPU (rebuild it with nvcc)")
            _warned_cpu_fallback = True
        ranks = torchsort.soft_rank(values.cpu(), regularization_strength=regularization_strength)
        return ranks.to(values.device)


def _standardize(values: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit spread: makes ``regularization_strength`` independent of the score's units.

    Without it, scores 0-104 apart by several points rank "hard" at strength 1.0 and the Spearman
    term has zero gradient; the seed's outputs (0-4) happened to sit in the soft range.
    """
    centred = values - values.mean()
    return centred / centred.pow(2).mean().sqrt().clamp_min(torch.finfo(values.dtype).eps)


def soft_spearman(pred: torch.Tensor, target: torch.Tensor, regularization_strength: float = 1.0) -> torch.Tensor:
    """Differentiable Spearman rho between two 1-D tensors of the same length (a scalar in [-1, 1]).

    Pearson correlation of the soft ranks of the standardised values; as ``regularization_strength -> 0``
    the soft ranks become the hard ones and this tends to the true Spearman (ties aside). The target is
    ranked the same way so both sides are on one scale. Fewer than two samples give 0 rather than NaN.
    """
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(
            f"soft_spearman wants two 1-D tensors of equal length, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = _soft_rank(_standardize(pred.float()).unsqueeze(0), regularization_strength)
    t = _soft_rank(_standardize(target.detach().float()).unsqueeze(0), regularization_strength)
    p = p - p.mean()
    t = t - t.mean()
    eps = torch.finfo(p.dtype).eps
    return (p * t).sum() / (p.norm() * t.norm()).clamp_min(eps)


class DivingLossTerms(NamedTuple):
    """The total loss and its parts (the parts are for logging)."""

    total: torch.Tensor
    mse: torch.Tensor
    spearman: torch.Tensor


def diving_loss_terms(
    out: torch.Tensor,
    target: torch.Tensor,
    mse_weight: float = 1.0,
    spcoef_weight: float = 0.0,
    regularization_strength: float = 1.0,
) -> DivingLossTerms:
    """``mse_weight * MSE(out, target) - spcoef_weight * soft_spearman(score(out), score(target))``.

    ``out`` and ``target`` are (B, 2) in the head's encoding. The Spearman term is only computed with a
    gradient when its weight is non-zero; otherwise it is reported detached for the log.
    """
    if out.shape != target.shape or out.shape[-1] != 2:
        raise ValueError(
            f"diving loss wants out and target of shape (B, 2), got {tuple(out.shape)} and {tuple(target.shape)}"
        )
    out = out.float()
    target = target.float()
    mse = F.mse_loss(out, target)
    if spcoef_weight != 0.0:
        rho = soft_spearman(decode_score(out), decode_score(target), regularization_strength)
        total = mse_weight * mse - spcoef_weight * rho
    else:
        with torch.no_grad():
            rho = soft_spearman(decode_score(out), decode_score(target), regularization_strength)
        total = mse_weight * mse
    return DivingLossTerms(total=total, mse=mse.detach(), spearman=rho.detach())


def diving_loss(
    out: torch.Tensor,
    target: torch.Tensor,
    mse_weight: float = 1.0,
    spcoef_weight: float = 0.0,
    regularization_strength: float = 1.0,
) -> torch.Tensor:
    """The scalar training loss; see :func:`diving_loss_terms`."""
    return diving_loss_terms(out, target, mse_weight, spcoef_weight, regularization_strength).total
