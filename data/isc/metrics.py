"""The descriptor track's metrics, as the competition defined them.

* **micro average precision (uAP)**: all predictions ``(query, reference, score)`` of all queries
  are ranked together by score, highest first; AP = sum over the ranked list of
  ``precision@i x (recall@i - recall@(i-1))``, where recall counts the ground-truth pairs found
  out of *all* ground-truth pairs (a pair never predicted lowers recall; distractor queries have no
  pair, so every prediction for them is a false positive).
* **ties count worst-case**: among predictions with the same score, the false ones are ranked
  first, so giving every prediction one score cannot buy a good AP.
* **recall at precision 0.9**: the highest recall among the cut-offs of the ranked list whose
  precision is at least 0.9; ``None`` when no cut-off reaches it.
* recall at rank 1 and 10 per ground-truth pair (ties again worst-case), for reading.

A prediction listed twice (same query and reference) is an error, as in the competition.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from data.retrieval.micro_ap import micro_average_precision, precision_recall

Prediction = Tuple[str, str, float]


def _labels(predictions: Sequence[Prediction], positives: set) -> Tuple[np.ndarray, np.ndarray]:
    pairs = [(q, r) for q, r, _ in predictions]
    if len(set(pairs)) != len(pairs):
        seen = set()
        for pair in pairs:
            if pair in seen:
                raise ValueError(f"predictions list the pair {pair} more than once")
            seen.add(pair)
    scores = np.asarray([float(s) for _, _, s in predictions], dtype=np.float64)
    if scores.size and not np.all(np.isfinite(scores)):
        raise ValueError("predictions hold a score that is NaN or infinite")
    truth = np.asarray([pair in positives for pair in pairs], dtype=bool)
    return scores, truth


def evaluate(predictions: Sequence[Prediction], ground_truth: Iterable[Tuple[str, Optional[str]]]) -> Dict[str, object]:
    """uAP, recall at precision 0.9 and recall at rank 1/10 of ``predictions`` against
    ``ground_truth`` rows ``(query_id, reference_id or None)``."""
    gt = list(ground_truth)
    positives = {(q, r) for q, r in gt if r}
    if not positives:
        raise ValueError("the ground truth lists no query with a reference: nothing to find")
    scores, truth = _labels(predictions, positives)
    if scores.size:
        uap = micro_average_precision(scores, truth, len(positives), ties="worst")
        precisions, recalls, thresholds = precision_recall(scores, truth, len(positives))
        reach = precisions >= 0.9
        if np.any(reach):
            best = int(np.argmax(np.where(reach, recalls, -1.0)))
            recall_p90, threshold_p90 = float(recalls[best]), float(thresholds[best])
        else:
            recall_p90 = threshold_p90 = None
    else:
        uap, recall_p90, threshold_p90 = 0.0, None, None
    ranks = true_pair_ranks(predictions, positives)
    return {
        "uap": uap,
        "recall_p90": recall_p90,
        "threshold_p90": threshold_p90,
        "recall_rank1": float(np.mean(ranks == 0)),
        "recall_rank10": float(np.mean(ranks < 10)),
        "positives": len(positives),
        "predictions": int(scores.size),
        "true_predictions": int(truth.sum()),
        "queries": len({q for q, _ in gt}),
    }


def true_pair_ranks(predictions: Sequence[Prediction], positives: set) -> np.ndarray:
    """For every ground-truth pair, its 0-based rank among its query's predictions (ties
    worst-case: every other prediction with a score >= its own ranks before it); a pair never
    predicted gets a rank larger than any list."""
    by_query: Dict[str, List[Tuple[str, float]]] = {}
    for q, r, s in predictions:
        by_query.setdefault(q, []).append((r, float(s)))
    missing = np.iinfo(np.int64).max
    ranks = []
    for q, r in sorted(positives):
        found = [s for ref, s in by_query.get(q, []) if ref == r]
        if not found:
            ranks.append(missing)
            continue
        ranks.append(sum(1 for ref, s in by_query[q] if s >= found[0] and ref != r))
    return np.asarray(ranks, dtype=np.int64)


def read_predictions(path) -> List[Prediction]:
    """A predictions CSV ``query_id,reference_id,score`` (the postprocess stage's output)."""
    import csv

    out: List[Prediction] = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query_id", "reference_id", "score"]:
            raise ValueError(f"{path}: the header must be 'query_id,reference_id,score', found {header!r}")
        for row in reader:
            if row:
                out.append((row[0], row[1], float(row[2])))
    return out
