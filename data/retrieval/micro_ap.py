"""Micro average precision (uAP) of a ranked list of predictions.

All predictions (of all queries) are ranked together by score, highest first; AP = sum over the
ranked list of ``precision@i x (recall@i - recall@(i-1))``, recall counting the true predictions
out of *all* ``num_positives`` (a positive never predicted lowers recall). Two conventions for
predictions with equal scores:

* ``ties="worst"`` (the ISC 2021 descriptor track): the false ones rank first, so one score for
  every prediction cannot buy a good AP;
* ``ties="grouped"`` (the VSC 2022 matching track's pair uAP, scikit-learn's
  ``average_precision_score`` scaled by found/all positives): a group of equal scores is one
  cut-off, at the precision of the whole group.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

TIES = ("worst", "grouped")


def precision_recall(scores: np.ndarray, truth: np.ndarray, num_positives: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every cut-off of the ranking (score descending, false before true
    among ties), and the score at each cut-off."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    order = np.lexsort((truth, -scores))  # last key first: score descending, then False < True
    truth, scores = truth[order], scores[order]
    hits = np.cumsum(truth)
    precisions = hits / np.arange(1, len(truth) + 1)
    recalls = hits / num_positives
    return precisions, recalls, scores


def micro_average_precision(scores: np.ndarray, truth: np.ndarray, num_positives: int, ties: str = "worst") -> float:
    """uAP of predictions with ``scores`` (higher: more confident) and ``truth`` (is each one a
    positive), out of ``num_positives`` positives in all."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: use one of {', '.join(TIES)}")
    if num_positives < 1:
        raise ValueError("num_positives must be at least 1: the ground truth has nothing to find")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    if not np.all(np.isfinite(scores)):
        raise ValueError("predictions hold a score that is NaN or infinite")
    precisions, recalls, ranked = precision_recall(scores, truth, num_positives)
    if ties == "grouped":  # one cut-off per distinct score: the last position of each group
        last = np.r_[ranked[1:] != ranked[:-1], True]
        precisions, recalls = precisions[last], recalls[last]
    previous = np.concatenate([[0.0], recalls[:-1]])
    return float(np.sum((recalls - previous) * precisions))
