"""The contrastive loss of the ISC 2021 / VSC 2022 seeds (pytorch-metric-learning's
ContrastiveLoss with its default reducer): positives pay ``d - pos_margin``, negatives
``neg_margin - d``, both clipped at 0, each averaged over its pairs with a non-zero loss."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``a`` and ``b`` (safe gradient at 0)."""
    sq = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.t()).clamp(min=0.0)
    return torch.sqrt(sq + 1e-12)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: torch.Tensor,
                     ref_labels: torch.Tensor, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     self_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Contrastive loss of every (anchor, ref) pair: positives (same label) pay ``d - pos_margin``,
    negatives ``neg_margin - d``, both clipped at 0; each term is averaged over its pairs with a
    non-zero loss (so easy pairs do not dilute it) and the two are summed. ``self_mask`` marks the
    pairs of an anchor with itself, which are skipped."""
    dist = pairwise_distance(embeddings.float(), ref_embeddings.float())
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    valid = torch.ones_like(same) if self_mask is None else ~self_mask
    pos = F.relu(dist - pos_margin) * (same & valid)
    neg = F.relu(neg_margin - dist) * (~same & valid)

    def mean_nonzero(x: torch.Tensor) -> torch.Tensor:
        count = (x > 0).sum()
        return x.sum() / count.clamp(min=1)

    pos_loss, neg_loss = mean_nonzero(pos), mean_nonzero(neg)
    return {"loss": pos_loss + neg_loss, "pos_loss": pos_loss.detach(), "neg_loss": neg_loss.detach(),
            "pos_pairs": (same & valid).sum().detach(), "active_neg": (neg > 0).sum().detach()}


def batch_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, pos_margin: float = 0.0,
                           neg_margin: float = 1.0) -> Dict[str, torch.Tensor]:
    """The loss of a batch against itself, every anchor's pair with itself skipped."""
    self_mask = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return contrastive_loss(embeddings, labels, embeddings, labels, pos_margin, neg_margin, self_mask)
