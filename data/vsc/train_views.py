"""vsc's own self-supervised training views for small presets: an image as it is and one copy
edit of it, the pair a copy detector must match.

The seed trains its first stages on DISC21 with ISC-style hard augmentations, which stand for
the copy edits of the test queries. A network trained from scratch for a minute on a CPU does not
learn the seed's full-strength hard views (``data.isc.datasets.TrainViews``), and at the strength
it does learn they do not cover what the synthetic queries do to a frame (a 40-90% crop, a flip,
a colour shift, an overlay). :class:`CopyEditViews` makes the second view with the same edit
family as the synthetic queries (``data.isc.augment.query_edit``), drawn afresh for every sample
from training images the evaluation videos never show; the first view is the image plainly
resized, as a reference frame is at extraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import torch
from torch.utils.data import Dataset

from data.isc import augment
from data.isc.datasets import _rng, to_tensor


class CopyEditViews(Dataset):
    """Image ``i`` plainly resized and ``ncrops - 1`` copy edits of it (``strength`` as the
    synthetic queries': ``moderate`` or ``strong``; an overlay's other picture is another training
    image), all with label ``i``."""

    def __init__(self, paths: Sequence[Path], input_size: int, mean, std, *, ncrops: int = 2,
                 strength: str = "moderate") -> None:
        if ncrops < 2:
            raise ValueError(f"ncrops={ncrops}: contrastive training needs at least 2 views per image")
        if strength not in augment.QUERY_EDITS:
            raise ValueError(f"copy edit strength {strength!r}: use one of {', '.join(augment.QUERY_EDITS)}")
        self.paths, self.input_size = list(paths), int(input_size)
        self.mean, self.std, self.ncrops, self.strength = mean, std, int(ncrops), strength

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rng = _rng()
        image = augment.read_rgb(self.paths[index])
        views = [augment.resize(image, self.input_size)]
        for _ in range(self.ncrops - 1):
            background = augment.read_rgb(self.paths[int(rng.integers(len(self.paths)))])
            edited, _ = augment.query_edit(image, rng, background, strength=self.strength)
            views.append(augment.resize(edited, self.input_size))
        return (torch.stack([to_tensor(v, self.mean, self.std) for v in views]),
                torch.tensor([index] * self.ncrops, dtype=torch.long))
