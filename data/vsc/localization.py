"""Temporal localisation of a copied segment in one (query, reference) pair from the similarity
matrix of their sampled frames.

A copy keeps the reference's speed, so its frames line up along one time offset
``ref time - query time``. :func:`localize` votes for that offset: offsets are binned at the
coarser frame step of the two videos, each query frame counts its best similarity within a bin,
and the bin with the largest sum above ``threshold`` wins. The query frames that match along it
(similarity above ``threshold``), split where more than ``max_gap`` frames in a row do not, give
one segment each: query span from the first to past the last matched frame, reference span from
their partners; the segment's score is their mean similarity.
"""

from __future__ import annotations

from typing import List, NamedTuple

import numpy as np


class Segment(NamedTuple):
    query_start: float
    query_end: float
    ref_start: float
    ref_end: float
    score: float


def localize(sim: np.ndarray, query_times: np.ndarray, ref_times: np.ndarray, query_step: float,
             ref_step: float, threshold: float = 0.0, max_gap: int = 1, min_frames: int = 1) -> List[Segment]:
    """Segments copied between the query (rows of ``sim``) and the reference (columns)."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.size == 0:
        return []
    width = max(query_step, ref_step)
    offsets = ref_times[None, :] - query_times[:, None]
    bins = np.floor(offsets / width + 0.5).astype(np.int64)
    best_bin, best_total = None, 0.0
    for b in np.unique(bins):
        in_bin = np.where(bins == b, sim, -np.inf).max(axis=1)
        total = np.clip(in_bin - threshold, 0.0, None).sum()
        if total > best_total:
            best_bin, best_total = b, total
    if best_bin is None:
        return []
    masked = np.where(np.abs(bins - best_bin) <= 0, sim, -np.inf)  # the winning diagonal only
    partner = masked.argmax(axis=1)
    value = masked[np.arange(len(sim)), partner]
    hit = np.flatnonzero(value > threshold)
    segments: List[Segment] = []
    runs = np.split(hit, np.flatnonzero(np.diff(hit) > max_gap + 1) + 1) if len(hit) else []
    for run in runs:
        if len(run) < min_frames:
            continue
        refs = partner[run]
        segments.append(Segment(float(query_times[run[0]]), float(query_times[run[-1]] + query_step),
                                float(ref_times[refs.min()]), float(ref_times[refs.max()] + ref_step),
                                float(value[run].mean())))
    return segments
