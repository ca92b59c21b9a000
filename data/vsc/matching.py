"""From frame descriptors to matches: score normalisation with the noise videos, candidate
pairs by frame-level kNN, temporal localisation of each candidate pair.

1. **score normalisation** (the VSC baseline's, with the seed's noise videos): every query frame's
   similarities drop by its mean similarity to its ``noise_k`` nearest noise frames, so a positive
   similarity means "closer than anything in videos that match nothing"; this calibrates trained
   and untrained descriptors alike;
2. **candidates**: each query frame's ``knn_k`` nearest reference frames (faiss); a reference
   with a normalised similarity above 0 among them is a candidate of the query, the best
   ``max_candidates`` kept;
3. **localisation** (:mod:`.localization`) of every candidate pair -> :class:`~.matches.Match` rows.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence

import numpy as np

from data.retrieval.knn import knn, normalize

from .localization import localize
from .matches import Match


class VideoDescriptors(NamedTuple):
    video_id: str
    descriptors: np.ndarray  # (frames, dim), unit rows
    times: np.ndarray        # (frames,) seconds
    step: float


def noise_offsets(query: np.ndarray, noise: np.ndarray, k: int) -> np.ndarray:
    """Each query frame's mean similarity to its ``k`` nearest noise frames (0 without noise)."""
    if len(noise) == 0 or k < 1:
        return np.zeros(len(query), dtype=np.float32)
    sims, _ = knn(noise, query, k, "ip")
    return sims.mean(axis=1)


def find_matches(queries: Sequence[VideoDescriptors], references: Sequence[VideoDescriptors],
                 noise: np.ndarray, *, knn_k: int = 25, noise_k: int = 1, max_candidates: int = 10,
                 max_gap: int = 1, min_frames: int = 1, threshold: float = 0.0) -> List[Match]:
    refs = {r.video_id: r for r in references}
    ref_frames = normalize(np.concatenate([r.descriptors for r in references]))
    ref_owner = np.concatenate([[i] * len(r.descriptors) for i, r in enumerate(references)])
    noise = normalize(noise) if len(noise) else noise
    matches: List[Match] = []
    for q in queries:
        qd = normalize(q.descriptors)
        offset = noise_offsets(qd, noise, noise_k)
        sims, idx = knn(ref_frames, qd, knn_k, "ip")
        best: Dict[int, float] = {}
        for frame_sims, frame_idx, off in zip(sims, idx, offset):
            for s, j in zip(frame_sims, frame_idx):
                if j >= 0 and s - off > threshold:
                    owner = int(ref_owner[j])
                    best[owner] = max(best.get(owner, -np.inf), float(s - off))
        for owner in sorted(best, key=lambda o: -best[o])[:max_candidates]:
            ref = refs[references[owner].video_id]
            sim = qd @ normalize(ref.descriptors).T - offset[:, None]
            for seg in localize(sim, q.times, ref.times, q.step, ref.step, threshold=threshold, max_gap=max_gap,
                                min_frames=min_frames):
                matches.append(Match(q.video_id, ref.video_id, seg.query_start, seg.query_end, seg.ref_start,
                                     seg.ref_end, seg.score))
    return matches
