"""The seed's post-process: database-side augmentation, negative embedding subtraction, exact kNN.

1. **DBA** on the training descriptors: each is replaced by the sum of its ``k`` nearest training
   descriptors (itself included) weighted by similarity^alpha (alpha 3), then re-normalised.
2. **NES**: every query and reference descriptor moves away from the dense part of the training
   distribution: ``x <- normalise(x - beta x mean of its k nearest DBA'd training descriptors)``
   (beta 0.35, k 10, once).
3. **exact kNN**: the ``k`` nearest references of each query by L2 distance; the score is the
   negated squared distance (higher is more similar).

The steps themselves are shared with the other metric-learning workflows (``data/retrieval/``:
faiss kNN, DBA, NES); this module chains them as the ISC seed did and writes its rows.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from data.retrieval.dba import database_side_augmentation
from data.retrieval.knn import normalize, search
from data.retrieval.nes import negative_embedding_subtraction


def to_rows(query_ids: Sequence[str], reference_ids: Sequence[str], scores: np.ndarray,
            indices: np.ndarray) -> List[Tuple[str, str, float]]:
    rows = []
    for qi, q in enumerate(query_ids):
        for score, ri in zip(scores[qi], indices[qi]):
            if ri >= 0:
                rows.append((q, reference_ids[int(ri)], float(score)))
    return rows


def postprocess(query: np.ndarray, reference: np.ndarray, train: np.ndarray, *, k: int = 10,
                dba_k: int = 10, dba_alpha: float = 3.0, nes_k: int = 10, nes_beta: float = 0.35,
                nes_iterations: int = 1) -> Dict[str, np.ndarray]:
    """The whole chain; returns the transformed descriptors and the kNN of both variants."""
    raw_scores, raw_ind = search(normalize(query), normalize(reference), k)
    train_dba = database_side_augmentation(normalize(train), dba_k, dba_alpha)
    q_iso = negative_embedding_subtraction(query, train_dba, nes_k, nes_beta, nes_iterations)
    r_iso = negative_embedding_subtraction(reference, train_dba, nes_k, nes_beta, nes_iterations)
    scores, ind = search(q_iso, r_iso, k)
    return {"query": q_iso, "reference": r_iso, "scores": scores, "indices": ind,
            "raw_scores": raw_scores, "raw_indices": raw_ind}
