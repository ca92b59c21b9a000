"""The VSC 2022 matching track's metrics, as the challenge defined them.

**Segment AP** (the track's score). A match is a box: its query span x its reference span. All
predictions, of all video pairs, are ranked by score (highest first) and taken in groups of equal
score. After each group, on each time axis (query, reference) and summed over video pairs:

* ``I`` = the length of (union of the pair's predicted spans) n (union of the pair's ground-truth
  spans whose box overlaps at least one predicted box of the pair);
* ``T`` = the length of the union of the pair's predicted spans;
* ``G`` = the length of the union of the pair's ground-truth spans (all of them, fixed).

Precision is ``sqrt(P_query x P_ref)`` with ``P = I / T``, recall ``sqrt(R_query x R_ref)`` with
``R = I / G``, and AP = sum over the groups of ``precision x (recall - previous recall)``.
Predictions on a pair with no ground truth add to ``T`` only; overlapping predictions count their
union once; a ground-truth segment no prediction's box touches adds nothing to ``I`` even where a
prediction's span covers it on one axis.

**Pair micro AP** (the track's auxiliary score): each (query, reference) pair scored by its best
match, ranked against the distinct ground-truth pairs; equal scores form one cut-off
(:func:`data.retrieval.micro_ap.micro_average_precision` with ``ties="grouped"``).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

from data.retrieval.micro_ap import micro_average_precision

from .matches import Match

AXES = ("query", "ref")
Span = Tuple[float, float]


def union_length(spans: Iterable[Span]) -> float:
    """Total length covered by ``spans`` (overlaps counted once)."""
    total, end = 0.0, -math.inf
    for lo, hi in sorted(spans):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def intersection_length(a: Sequence[Span], b: Sequence[Span]) -> float:
    """Length of (union of ``a``) n (union of ``b``): ``|A| + |B| - |A u B|``."""
    return union_length(a) + union_length(b) - union_length(list(a) + list(b))


class _PairState:
    """One video pair's ground truth and the predictions ranked so far."""

    def __init__(self) -> None:
        self.gts: List[Match] = []
        self.preds: List[Match] = []
        self.inter = {axis: 0.0 for axis in AXES}
        self.total = {axis: 0.0 for axis in AXES}

    def add(self, pred: Match) -> Tuple[Dict[str, float], Dict[str, float]]:
        """Add a prediction; return the changes of ``I`` and ``T`` on each axis."""
        self.preds.append(pred)
        touched = [g for g in self.gts if any(g.overlaps(p) for p in self.preds)]
        d_inter, d_total = {}, {}
        for axis in AXES:
            pred_spans = [p.span(axis) for p in self.preds]
            inter = intersection_length(pred_spans, [g.span(axis) for g in touched])
            total = union_length(pred_spans)
            d_inter[axis], d_total[axis] = inter - self.inter[axis], total - self.total[axis]
            self.inter[axis], self.total[axis] = inter, total
        return d_inter, d_total


def segment_ap(ground_truth: Sequence[Match], predictions: Sequence[Match]) -> float:
    """The matching track's segment AP of ``predictions`` against ``ground_truth``."""
    pairs: Dict[Tuple[str, str], _PairState] = defaultdict(_PairState)
    for gt in ground_truth:
        pairs[gt.pair()].gts.append(gt)
    gt_length = {axis: sum(union_length([g.span(axis) for g in p.gts]) for p in pairs.values()) for axis in AXES}
    if min(gt_length.values()) <= 0:
        raise ValueError("the ground truth covers no time on one of the axes: nothing to find")
    inter = {axis: 0.0 for axis in AXES}
    total = {axis: 0.0 for axis in AXES}
    ap = recall = 0.0
    ranked = sorted(predictions, key=lambda m: -m.score)
    for _, group in itertools.groupby(ranked, key=lambda m: m.score):
        for pred in group:
            d_inter, d_total = pairs[pred.pair()].add(pred)
            for axis in AXES:
                inter[axis] += d_inter[axis]
                total[axis] += d_total[axis]
        new_recall = math.sqrt((inter["query"] / gt_length["query"]) * (inter["ref"] / gt_length["ref"]))
        precision = (math.sqrt((inter["query"] / total["query"]) * (inter["ref"] / total["ref"]))
                     if min(total.values()) > 0 else 0.0)
        ap += precision * (new_recall - recall)
        recall = new_recall
    return ap


def pair_scores(matches: Iterable[Match]) -> Dict[Tuple[str, str], float]:
    """Each (query, reference) pair's best score."""
    best: Dict[Tuple[str, str], float] = {}
    for m in matches:
        best[m.pair()] = max(m.score, best.get(m.pair(), -math.inf))
    return best


def pair_micro_ap(ground_truth: Sequence[Match], predictions: Sequence[Match]) -> float:
    """Video-pair micro AP: pairs scored by their best match, ties as one cut-off."""
    positives = {g.pair() for g in ground_truth}
    if not positives:
        raise ValueError("the ground truth lists no pair: nothing to find")
    scored = pair_scores(predictions)
    truth = [pair in positives for pair in scored]
    return micro_average_precision(list(scored.values()), truth, len(positives), ties="grouped")


def evaluate(ground_truth: Sequence[Match], predictions: Sequence[Match]) -> Dict[str, float]:
    gt_pairs = {g.pair() for g in ground_truth}
    found = {m.pair() for m in predictions} & gt_pairs
    return {"segment_ap": segment_ap(ground_truth, predictions),
            "pair_micro_ap": pair_micro_ap(ground_truth, predictions),
            "predictions": len(predictions), "ground_truth_pairs": len(gt_pairs),
            "pairs_found": len(found)}
