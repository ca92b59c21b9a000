"""Exact nearest-neighbour search with faiss: flat (exact) indexes, moved to every GPU when faiss
sees one (``faiss.get_num_gpus() > 0``, the faiss-gpu build), on the CPU otherwise; the code is
the same."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; an all-zero row stays zero)."""
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


def search(query: np.ndarray, reference: np.ndarray, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """``(scores, indices)``: the k nearest references of each query, score = -squared L2."""
    dist, ind = knn(reference, query, k, "l2")
    return -dist, ind
