"""Database-side augmentation (DBA): each descriptor is replaced by the sum of its ``k`` nearest
neighbours in the same set (itself included) weighted by similarity^alpha, then re-normalised."""

from __future__ import annotations

import numpy as np

from .knn import knn, normalize


def database_side_augmentation(descriptors: np.ndarray, k: int = 10, alpha: float = 3.0) -> np.ndarray:
    sims, ind = knn(descriptors, descriptors, k, "ip")
    weights = np.sign(sims) * np.abs(sims) ** alpha  # sim^alpha, defined for negative sims too
    return normalize((descriptors[ind] * weights[..., None]).sum(axis=1))
