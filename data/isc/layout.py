"""The DISC21 layout on disk: image lists with their ids, ground-truth files, a launch-time check.

``query_images/Q00000.jpg``, ``reference_images/R000000.jpg``, ``training_images/T000000.jpg``
(sub-folders allowed, as the seed globs ``**/*.jpg``); ground truth is a CSV with the header
``query_id,reference_id`` and one row per query, the reference empty for a distractor query.
No numpy or torch here: the launch path imports this module.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ID_PATTERNS = {"query": re.compile(r"^Q\d{5,}$"), "reference": re.compile(r"^R\d{6,}$"),
               "training": re.compile(r"^T\d{6,}$")}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class LayoutError(ValueError):
    """The data root does not hold what the workflow needs; the message says what and where."""


def list_images(folder: Path, kind: str, limit: Optional[int] = None) -> Tuple[List[str], List[Path]]:
    """Sorted ``(ids, paths)`` of the images under ``folder`` (recursively); the id is the file
    stem. Ids must look like the kind's (Q00000, R000000, T000000) and be unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LayoutError(f"{folder} does not exist: the DISC21 layout needs it ({kind} images)")
    paths = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.stem)
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise LayoutError(f"{folder} holds no images (.jpg/.png): the {kind} images are missing")
    ids = [p.stem for p in paths]
    pattern = ID_PATTERNS[kind]
    bad = [i for i in ids if not pattern.match(i)]
    if bad:
        raise LayoutError(f"{folder}: {len(bad)} {kind} image name(s) are not ids like "
                          f"{pattern.pattern[1:-1]!r}, e.g. {bad[0]!r}")
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise LayoutError(f"{folder}: id {dup} appears twice (two files with the same name in sub-folders)")
    return ids, paths


def read_ground_truth(path: Path) -> List[Tuple[str, Optional[str]]]:
    """``[(query_id, reference_id or None), ...]`` from a ground-truth CSV; checks the header and
    the ids, and that no (query, reference) pair is listed twice."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"ground truth {path} does not exist")
    rows: List[Tuple[str, Optional[str]]] = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["query_id", "reference_id"]:
            raise LayoutError(f"{path}: the header must be 'query_id,reference_id', found {header!r}")
        seen = set()
        for line_no, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            query = row[0].strip()
            ref = row[1].strip() if len(row) > 1 else ""
            if not ID_PATTERNS["query"].match(query):
                raise LayoutError(f"{path}:{line_no}: query id {query!r} is not like Q00000")
            if ref and not ID_PATTERNS["reference"].match(ref):
                raise LayoutError(f"{path}:{line_no}: reference id {ref!r} is not like R000000")
            if (query, ref) in seen:
                raise LayoutError(f"{path}:{line_no}: the pair ({query}, {ref or 'no reference'}) is listed twice")
            seen.add((query, ref))
            rows.append((query, ref or None))
    return rows


def positive_pairs(rows: Sequence[Tuple[str, Optional[str]]]) -> List[Tuple[str, str]]:
    return [(q, r) for q, r in rows if r]


@dataclass(frozen=True)
class Disc21:
    """Where the parts of one DISC21-layout root are (names relative to ``root``)."""

    root: Path
    train_queries: str = "query_images"
    train_ground_truth: str = "public_ground_truth.csv"
    eval_queries: str = "query_images_phase2"
    eval_ground_truth: str = "phase2_ground_truth.csv"

    def path(self, name: str) -> Path:
        p = Path(name).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def references(self) -> Path:
        return self.root / "reference_images"

    @property
    def training(self) -> Path:
        return self.root / "training_images"

    def check(self, need: Sequence[str] = ("references", "training", "train_queries", "train_ground_truth",
                                           "eval_queries", "eval_ground_truth")) -> Dict[str, str]:
        """The parts that are missing, ``{part: why}`` (empty when all are there). Only the
        directories' existence and the ground truth files are read: no image is decoded."""
        problems: Dict[str, str] = {}
        folders = {"references": self.references, "training": self.training,
                   "train_queries": self.path(self.train_queries), "eval_queries": self.path(self.eval_queries)}
        for part in need:
            if part in folders:
                if not folders[part].is_dir():
                    problems[part] = f"{folders[part]} does not exist"
            else:
                gt = self.path(getattr(self, part))
                try:
                    rows = read_ground_truth(gt)
                    if not positive_pairs(rows):
                        problems[part] = f"{gt} lists no query with a reference"
                except LayoutError as exc:
                    problems[part] = str(exc)
        return problems
