"""Negative embedding subtraction (NES): a descriptor moves away from the dense part of a set of
negatives (descriptors of unrelated images): ``x <- normalise(x - beta x mean of its k nearest
negatives)``, ``iterations`` times."""

from __future__ import annotations

import numpy as np

from .knn import knn, normalize


def negative_embedding_subtraction(x: np.ndarray, negatives: np.ndarray, k: int = 10, beta: float = 0.35,
                                   iterations: int = 1) -> np.ndarray:
    x = normalize(x)
    for _ in range(iterations):
        _, ind = knn(negatives, x, k, "ip")
        x = normalize(x - beta * negatives[ind].mean(axis=1))
    return x
