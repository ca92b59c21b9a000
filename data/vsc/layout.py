"""The VSC 2022 layout on disk (the competition's ``train/`` and ``test/`` folders) and, beside
it, the DISC21 images the seed trains on.

    root/train/query/Q100001.mp4 ...            # query videos (train split: they have ground truth)
    root/train/reference/R100001.mp4 ...        # reference videos
    root/test/reference/R200001.mp4 ...         # the seed's "noise" videos: match no query
    root/train/train_matching_ground_truth.csv  # query_id,ref_id,query_start,query_end,ref_start,ref_end (s)
    root/train/train_query_metadata.csv         # video_id,... (one row per video)
    root/train/train_reference_metadata.csv
    root/test/test_reference_metadata.csv

No numpy or torch here: the launch path imports this module.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

VIDEO_SETS = ("query", "reference", "noise")


class LayoutError(ValueError):
    """The data root does not hold what the workflow needs; the message says what and where."""


@dataclass
class VscLayout:
    root: Path
    query_dir: str = "train/query"
    reference_dir: str = "train/reference"
    noise_dir: str = "test/reference"
    ground_truth: str = "train/train_matching_ground_truth.csv"
    query_metadata: str = "train/train_query_metadata.csv"
    reference_metadata: str = "train/train_reference_metadata.csv"
    noise_metadata: str = "test/test_reference_metadata.csv"

    def path(self, name: str) -> Path:
        """A layout entry (``"query_dir"``, ``"ground_truth"``...) or a path relative to the root."""
        return Path(self.root) / getattr(self, name, name)

    def folder_and_metadata(self, kind: str) -> Tuple[Path, Path]:
        if kind not in VIDEO_SETS:
            raise ValueError(f"video set {kind!r}: use one of {', '.join(VIDEO_SETS)}")
        return self.path(f"{kind}_dir"), self.path(f"{kind}_metadata")

    def videos(self, kind: str) -> Tuple[List[str], List[Path]]:
        """``(ids, paths)`` of a video set, in the metadata CSV's order (its ``video_id`` column)."""
        folder, metadata = self.folder_and_metadata(kind)
        ids = read_video_ids(metadata)
        paths = [folder / f"{video_id}.mp4" for video_id in ids]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise LayoutError(f"{metadata} lists {len(missing)} video(s) that {folder} lacks, e.g. {missing[0].name}")
        return ids, paths

    def check(self) -> Dict[str, str]:
        """What is missing, by entry name (empty when the layout is whole)."""
        problems: Dict[str, str] = {}
        for kind in VIDEO_SETS:
            folder, metadata = self.folder_and_metadata(kind)
            if not folder.is_dir():
                problems[f"{kind}_dir"] = f"{folder} does not exist ({kind} videos)"
            if not metadata.is_file():
                problems[f"{kind}_metadata"] = f"{metadata} does not exist ({kind} metadata CSV)"
        if not self.path("ground_truth").is_file():
            problems["ground_truth"] = f"{self.path('ground_truth')} does not exist (matching ground truth)"
        return problems


def read_video_ids(path: Path) -> List[str]:
    """The ``video_id`` column of a metadata CSV."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"metadata {path} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "video_id" not in (reader.fieldnames or ()):
            raise LayoutError(f"{path}: no video_id column (found {reader.fieldnames})")
        ids = [row["video_id"] for row in reader if row.get("video_id")]
    if len(set(ids)) != len(ids):
        raise LayoutError(f"{path}: a video_id is listed twice")
    return ids
