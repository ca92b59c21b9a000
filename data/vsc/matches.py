"""A match of the VSC matching track: a query segment copied from a reference segment, times in
seconds, with a confidence ``score`` (1 in the ground truth). CSV columns as the challenge's:
``query_id, ref_id, query_start, query_end, ref_start, ref_end[, score]``."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, List, NamedTuple, Tuple

COLUMNS = ("query_id", "ref_id", "query_start", "query_end", "ref_start", "ref_end")


class Match(NamedTuple):
    query_id: str
    ref_id: str
    query_start: float
    query_end: float
    ref_start: float
    ref_end: float
    score: float = 1.0

    def pair(self) -> Tuple[str, str]:
        return self.query_id, self.ref_id

    def span(self, axis: str) -> Tuple[float, float]:
        """The segment on the ``"query"`` or ``"ref"`` time axis."""
        return (self.query_start, self.query_end) if axis == "query" else (self.ref_start, self.ref_end)

    def overlaps(self, other: "Match") -> bool:
        """Do the two boxes (query span x ref span) share some area?"""
        dq = min(self.query_end, other.query_end) - max(self.query_start, other.query_start)
        dr = min(self.ref_end, other.ref_end) - max(self.ref_start, other.ref_start)
        return dq > 0 and dr > 0


def read_matches(path: str | os.PathLike, ground_truth: bool = False) -> List[Match]:
    """Matches from a CSV with a header naming at least :data:`COLUMNS` (and ``score`` unless it is
    the ground truth, whose score is 1)."""
    out: List[Match] = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = set(COLUMNS) | (set() if ground_truth else {"score"})
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the header lacks {', '.join(sorted(missing))} (found {reader.fieldnames})")
        for row in reader:
            times = [float(row[c]) for c in COLUMNS[2:]]
            if times[1] < times[0] or times[3] < times[2]:
                raise ValueError(f"{path}: a segment ends before it starts: {row}")
            out.append(Match(row["query_id"], row["ref_id"], *times,
                             score=1.0 if ground_truth else float(row["score"])))
    return out


def write_matches(path: str | os.PathLike, matches: Iterable[Match], with_score: bool = True) -> None:
    """Write atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS + (("score",) if with_score else ()))
        for m in matches:
            row = [m.query_id, m.ref_id] + [f"{t:.3f}" for t in m[2:6]]
            writer.writerow(row + ([f"{m.score:.6f}"] if with_score else []))
    os.replace(tmp, path)
