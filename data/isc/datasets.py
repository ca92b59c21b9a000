"""Torch datasets of the isc workflow (training views, ground-truth pairs, plain extraction).

Every training dataset returns ``(images, labels)``: ``images`` a float tensor ``[m, 3, S, S]``
(normalised with the backbone's mean and std), ``labels`` a long tensor ``[m]``, so a batch is
``[B, m, 3, S, S]`` / ``[B, m]`` and the task flattens it. Labels are image indices: two views of
training image ``i`` share label ``i``; extra negatives (reference images) get
``NEGATIVE_OFFSET + reference index``, which no training label reaches. Randomness comes from
numpy's global RNG, which the engine seeds per sample from (seed, epoch, index).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from . import augment

NEGATIVE_OFFSET = 10_000_000

# One OpenCV thread per process: the loader runs one process per worker already, and OpenCV's
# default (a thread per core in every worker) oversubscribes the CPUs the job was given.
cv2.setNumThreads(1)


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def _rng() -> np.random.Generator:
    return np.random.default_rng(int(np.random.randint(0, 2**31 - 1)))


class EvalImages(Dataset):
    """Images resized to ``input_size`` x ``input_size`` (the seed's extraction preprocess)."""

    def __init__(self, paths: Sequence[Path], input_size: int, mean, std) -> None:
        self.paths, self.input_size, self.mean, self.std = list(paths), int(input_size), mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = augment.resize(augment.read_rgb(self.paths[index]), self.input_size)
        return to_tensor(image, self.mean, self.std)


class TrainViews(Dataset):
    """Self-supervised views of training images (v83, v86, v98): one moderate view and
    ``ncrops - 1`` hard views of image ``i`` (label ``i``), then ``extra_negatives`` reference
    images resized plainly (v98's extra negatives)."""

    def __init__(self, paths: Sequence[Path], input_size: int, mean, std, *, ncrops: int = 2,
                 overlay_p: float = 0.05, hard_strength: float = 1.0, hard_crop_scale: float = 0.15,
                 negative_paths: Sequence[Path] = (), extra_negatives: int = 0) -> None:
        if ncrops < 2:
            raise ValueError(f"ncrops={ncrops}: contrastive training needs at least 2 views per image")
        if extra_negatives and not negative_paths:
            raise ValueError("extra_negatives > 0 needs reference images to draw them from")
        self.paths, self.input_size = list(paths), int(input_size)
        self.mean, self.std, self.ncrops = mean, std, int(ncrops)
        self.overlay_p, self.hard_strength = float(overlay_p), float(hard_strength)
        self.hard_crop_scale = float(hard_crop_scale)
        self.negative_paths, self.extra_negatives = list(negative_paths), int(extra_negatives)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rng = _rng()
        image = augment.read_rgb(self.paths[index])

        def other() -> np.ndarray:
            return augment.read_rgb(self.paths[int(rng.integers(len(self.paths)))])

        views = [augment.moderate_view(image, rng, self.input_size)]
        views += [augment.hard_view(image, rng, self.input_size, others=other, overlay_p=self.overlay_p,
                                    op_scale=self.hard_strength, crop_scale=self.hard_crop_scale)
                  for _ in range(self.ncrops - 1)]
        labels = [index] * self.ncrops
        for _ in range(self.extra_negatives):
            j = int(rng.integers(len(self.negative_paths)))
            views.append(augment.resize(augment.read_rgb(self.negative_paths[j]), self.input_size))
            labels.append(NEGATIVE_OFFSET + j)
        return (torch.stack([to_tensor(v, self.mean, self.std) for v in views]),
                torch.tensor(labels, dtype=torch.long))


class GroundTruthPairs(Dataset):
    """Supervised pairs (v107): query ``i`` and its reference share label ``i``; ``negatives``
    reference images that are no query's reference follow, each with its own label. All resized
    plainly, as the seed's v107."""

    def __init__(self, query_paths: Sequence[Path], reference_paths: Sequence[Path],
                 negative_paths: Sequence[Path], input_size: int, mean, std, *, negatives: int = 30) -> None:
        if len(query_paths) != len(reference_paths):
            raise ValueError("one reference per query")
        if negatives and not negative_paths:
            raise ValueError("no reference image is free to serve as a negative")
        self.query_paths, self.reference_paths = list(query_paths), list(reference_paths)
        self.negative_paths, self.negatives = list(negative_paths), int(negatives)
        self.input_size, self.mean, self.std = int(input_size), mean, std

    def __len__(self) -> int:
        return len(self.query_paths)

    def _load(self, path: Path) -> torch.Tensor:
        return to_tensor(augment.resize(augment.read_rgb(path), self.input_size), self.mean, self.std)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rng = _rng()
        images = [self._load(self.query_paths[index]), self._load(self.reference_paths[index])]
        labels = [index, index]
        for _ in range(self.negatives):
            j = int(rng.integers(len(self.negative_paths)))
            images.append(self._load(self.negative_paths[j]))
            labels.append(NEGATIVE_OFFSET + j)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def supervised_pairs(layout, queries_limit: Optional[int] = None):
    """``(query_paths, reference_paths, negative_paths)`` for v107 from a :class:`~.layout.Disc21`:
    the ground-truth pairs whose images exist, and the references that are no query's reference."""
    from .layout import list_images, positive_pairs, read_ground_truth

    q_ids, q_paths = list_images(layout.path(layout.train_queries), "query")
    r_ids, r_paths = list_images(layout.references, "reference")
    q_index, r_index = dict(zip(q_ids, q_paths)), dict(zip(r_ids, r_paths))
    pairs = [(q, r) for q, r in positive_pairs(read_ground_truth(layout.path(layout.train_ground_truth)))
             if q in q_index and r in r_index]
    if queries_limit is not None:
        pairs = pairs[:queries_limit]
    if not pairs:
        raise ValueError(f"no ground-truth pair of {layout.path(layout.train_ground_truth)} has both images "
                         f"on disk under {layout.root}")
    used = {r for _, r in pairs}
    negatives: List[Path] = [p for i, p in zip(r_ids, r_paths) if i not in used]
    return [q_index[q] for q, _ in pairs], [r_index[r] for _, r in pairs], negatives
