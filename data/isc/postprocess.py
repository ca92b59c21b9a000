"""The seed's post-process: database-side augmentation, negative embedding subtraction, exact kNN.

1. **DBA** on the training descriptors: each is replaced by the sum of its ``k`` nearest training
   descriptors (itself included) weighted by similarity^alpha (alpha 3), then re-normalised.
2. **NES**: every query and reference descriptor moves away from the dense part of the training
   distribution: ``x <- normalise(x - beta x mean of its k nearest DBA'd training descriptors)``
   (beta 0.35, k 10, once).
3. **exact kNN**: the ``k`` nearest references of each query by L2 distance; the score is the
   negated squared distance (higher is more similar).

faiss does the searches: flat (exact) indexes, moved to every GPU when faiss sees one
(``faiss.get_num_gpus() > 0``, the faiss-gpu build), on the CPU otherwise; the code is the same.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def flat_index(dim: int, metric: str):
    """An exact faiss index (``"ip"`` inner product or ``"l2"``), on all GPUs when there are any."""
    import faiss

    index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def knn(database: np.ndarray, queries: np.ndarray, k: int, metric: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(values, indices)`` of the ``k`` nearest database rows of each query (k capped at the
    database size). ``values`` are inner products (``ip``) or squared L2 distances (``l2``)."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(int(k), len(database)))
    index = flat_index(database.shape[1], metric)
    index.add(database)
    return index.search(queries, k)


def database_side_augmentation(train: np.ndarray, k: int = 10, alpha: float = 3.0) -> np.ndarray:
    sims, ind = knn(train, train, k, "ip")
    weights = np.sign(sims) * np.abs(sims) ** alpha  # sim^alpha, defined for negative sims too
    return normalize((train[ind] * weights[..., None]).sum(axis=1))


def negative_embedding_subtraction(x: np.ndarray, negatives: np.ndarray, k: int = 10, beta: float = 0.35,
                                   iterations: int = 1) -> np.ndarray:
    x = normalize(x)
    for _ in range(iterations):
        _, ind = knn(negatives, x, k, "ip")
        x = normalize(x - beta * negatives[ind].mean(axis=1))
    return x


def search(query: np.ndarray, reference: np.ndarray, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """``(scores, indices)``: the k nearest references of each query, score = -squared L2."""
    dist, ind = knn(reference, query, k, "l2")
    return -dist, ind


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
