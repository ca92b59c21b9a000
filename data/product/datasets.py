"""Layouts and torch datasets of the product workflow.

Readers: :func:`read_product10k` (``train.csv`` / ``test_kaggletest.csv``: ``name, class``),
:func:`read_dev_set` (``gallery.csv``: ``img_path, product_id``; ``queries.csv``: ``img_path,
product_id, bbox_x, bbox_y, bbox_w, bbox_h``), :func:`read_training_csv` (``image_path, label``).

Datasets return normalised float tensors ``[3, S, S]``. Training images get the seed's kind of
light augmentation (a random resized crop, a flip, a little colour jitter); randomness comes from
numpy's global RNG, which the engine seeds per sample from (seed, epoch, index).
:class:`ClassBalancedPairs` is the XBM phases' class-balanced batch: each item is two images of
one product, the product drawn with probability proportional to its image count (the seed's
``ClassBalancedBatchSampler``: batch/2 classes x 2 images), so every batch holds positives.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

cv2.setNumThreads(1)  # one process per loader worker already

Box = Tuple[int, int, int, int]


# -- layouts ----------------------------------------------------------------------------------------
def _rows(path: Path) -> List[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_product10k(root: Path, split: str = "train") -> Tuple[List[Path], List[int]]:
    """Images and class ids of Product10K's ``train`` (train.csv) or ``test`` (test_kaggletest.csv)."""
    listing = root / ("train.csv" if split == "train" else "test_kaggletest.csv")
    rows = _rows(listing)
    if rows and not {"name", "class"} <= set(rows[0]):
        raise ValueError(f"{listing}: expected the columns name,class; found {', '.join(rows[0])}")
    return [root / split / r["name"] for r in rows], [int(r["class"]) for r in rows]


def _dev_path(root: Path, folder: str, rel: str) -> Path:
    path = root / rel
    return path if path.exists() or "/" in rel else root / folder / rel


def read_dev_set(root: Path):
    """(gallery paths, gallery product ids), (query paths, query product ids, query boxes)."""
    gallery = _rows(root / "gallery.csv")
    queries = _rows(root / "queries.csv")
    g_paths = [_dev_path(root, "gallery", r["img_path"]) for r in gallery]
    g_ids = [int(r["product_id"]) for r in gallery]
    q_paths = [_dev_path(root, "queries", r["img_path"]) for r in queries]
    q_ids = [int(r["product_id"]) for r in queries]
    boxes = [tuple(int(float(r[k])) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")) for r in queries]
    return (g_paths, g_ids), (q_paths, q_ids, boxes)


def read_training_csv(path: Path) -> Tuple[List[Path], List[int]]:
    rows = _rows(path)
    return [Path(r["image_path"]) for r in rows], [int(r["label"]) for r in rows]


# -- images -----------------------------------------------------------------------------------------
def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def crop_box(image: np.ndarray, box: Optional[Box]) -> np.ndarray:
    """The box ``(x, y, w, h)`` of an image, clipped to it (the whole image when None or empty)."""
    if box is None:
        return image
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(image.shape[1], x + w), min(image.shape[0], y + h)
    return image[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else image


def to_tensor(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


def augment(image: np.ndarray) -> np.ndarray:
    """A random resized crop (60-100% of the area), a horizontal flip, brightness/contrast jitter."""
    h, w = image.shape[:2]
    scale = np.random.uniform(0.6, 1.0)
    ratio = np.exp(np.random.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(scale * h * w / ratio))))
    cw = int(min(w, round(np.sqrt(scale * h * w * ratio))))
    y, x = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)
    out = image[y:y + ch, x:x + cw]
    if np.random.rand() < 0.5:
        out = out[:, ::-1]
    gain, bias = np.random.uniform(0.8, 1.2), np.random.uniform(-20, 20)
    return np.clip(out.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)


class LabelledImages(Dataset):
    """(image, label) for the ArcFace phases (Product10K)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], size: int, mean, std, train: bool = True) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.size, self.mean, self.std, self.train = int(size), mean, std, train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_rgb(self.paths[index])
        if self.train:
            image = augment(image)
        return to_tensor(image, self.size, self.mean, self.std), torch.tensor(self.labels[index], dtype=torch.long)


class ClassBalancedPairs(Dataset):
    """Two augmented images of one product per item (the XBM phases' class-balanced batches).
    Item i draws its product with probability proportional to the product's image count; an epoch
    has as many items as images / 2, as the seed's sampler has batches."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], size: int, mean, std, per_class: int = 2) -> None:
        self.paths, self.size, self.mean, self.std, self.per_class = list(paths), int(size), mean, std, per_class
        by_class: dict = {}
        for i, label in enumerate(labels):
            by_class.setdefault(int(label), []).append(i)
        self.classes = sorted(by_class)
        self.members = [by_class[c] for c in self.classes]
        counts = np.array([len(m) for m in self.members], np.float64)
        self.probability = counts / counts.sum()

    def __len__(self) -> int:
        return max(1, len(self.paths) // self.per_class)

    def __getitem__(self, index: int):
        c = int(np.random.choice(len(self.classes), p=self.probability))
        members = self.members[c]
        picks = np.random.choice(members, self.per_class, replace=len(members) < self.per_class)
        images = torch.stack([to_tensor(augment(read_rgb(self.paths[i])), self.size, self.mean, self.std)
                              for i in picks])
        return images, torch.full((self.per_class,), self.classes[c], dtype=torch.long)


class RetrievalImages(Dataset):
    """Dev-set images for validation and eval: (image, product id, is_query); a query is cropped
    to its box first (as the challenge gives boxes with the queries)."""

    def __init__(self, items: Sequence[Tuple[Path, Optional[Box], int, bool]], size: int, mean, std) -> None:
        self.items, self.size, self.mean, self.std = list(items), int(size), mean, std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, box, label, is_query = self.items[index]
        image = crop_box(read_rgb(path), box)
        return to_tensor(image, self.size, self.mean, self.std), torch.tensor(label), torch.tensor(bool(is_query))


def dev_set_items(root: Path, crop_queries: bool = True) -> List[Tuple[Path, Optional[Box], int, bool]]:
    """Queries (with their boxes) first, then the gallery."""
    (g_paths, g_ids), (q_paths, q_ids, boxes) = read_dev_set(root)
    queries = [(p, b if crop_queries else None, i, True) for p, i, b in zip(q_paths, q_ids, boxes)]
    return queries + [(p, None, i, False) for p, i in zip(g_paths, g_ids)]
