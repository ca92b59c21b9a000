"""A cheap pre-flight check of the competition videos, before any job is submitted.

Reads only MP4 box headers and the ``moov`` index (no decoding, no OpenCV, milliseconds per file):
a missing file, garbage bytes, a truncated download (the boxes do not add up to the file size) or a
video shorter than its clips need is reported at launch time with the same advice as the prepare
stage gives, instead of failing hours later in a batch job. A video that passes can still hold
undecodable frames; the prepare stage reports those.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .annotations import check_videos_annotated, load_annotations, parse_videos
from .errors import ExtractError

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}
_MAX_MOOV = 512 * 2**20


def _iter_boxes(buf: bytes, start: int, end: int) -> Iterator[Tuple[bytes, int, int]]:
    """(type, payload_start, box_end) of the boxes in ``buf[start:end]``."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack_from(">Q", buf, pos + 8)[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _video_sample_count(moov: bytes) -> Optional[int]:
    """Number of samples (frames) of the first video track, from its ``stsz`` box."""
    for kind, p0, p1 in _iter_boxes(moov, 0, len(moov)):
        if kind != b"trak":
            continue
        handler, count = None, None
        stack = [(p0, p1)]
        while stack:
            a, b = stack.pop()
            for k, q0, q1 in _iter_boxes(moov, a, b):
                if k in _CONTAINERS:
                    stack.append((q0, q1))
                elif k == b"hdlr" and q0 + 12 <= q1:
                    handler = moov[q0 + 8:q0 + 12]
                elif k == b"stsz" and q0 + 12 <= q1:
                    count = struct.unpack_from(">I", moov, q0 + 8)[0]
        if handler == b"vide":
            return count
    return None


def inspect_mp4(path: os.PathLike) -> Dict[str, Any]:
    """{"ok": bool, "error": str | None, "frames": int | None, "bytes": int} for one file."""
    path = Path(path)
    out: Dict[str, Any] = {"ok": False, "error": None, "frames": None, "bytes": 0}
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        out["error"] = f"{path} does not exist"
        return out
    out["bytes"] = size
    kinds: List[bytes] = []
    moov: Optional[bytes] = None
    with open(path, "rb") as fh:
        pos = 0
        while pos < size:
            fh.seek(pos)
            head = fh.read(16)
            if len(head) < 8:
                out["error"] = f"{path}: {size - pos} stray bytes at the end (truncated or corrupt)"
                return out
            box_size, kind = struct.unpack_from(">I4s", head)
            header = 8
            if box_size == 1:
                if len(head) < 16:
                    out["error"] = f"{path}: truncated box header at byte {pos}"
                    return out
                box_size, header = struct.unpack_from(">Q", head, 8)[0], 16
            elif box_size == 0:
                box_size = size - pos
            if not (kind.isalnum() or kind.replace(b" ", b"a").isalnum()) or box_size < header:
                what = "not an MP4 file" if pos == 0 else f"garbage at byte {pos}"
                out["error"] = f"{path}: {what} (corrupt, or an error page saved as .mp4)"
                return out
            if pos + box_size > size:
                out["error"] = (f"{path}: truncated: box '{kind.decode('latin-1')}' needs "
                                f"{pos + box_size} bytes, the file has {size} (download it again)")
                return out
            kinds.append(kind)
            if kind == b"moov" and box_size <= _MAX_MOOV:
                fh.seek(pos + header)
                moov = fh.read(box_size - header)
            pos += box_size
    if not kinds or kinds[0] != b"ftyp":
        out["error"] = f"{path}: not an MP4 file (no 'ftyp' box first)"
        return out
    if b"moov" not in kinds:
        out["error"] = f"{path}: no 'moov' index (an interrupted recording or download)"
        return out
    out["frames"] = _video_sample_count(moov) if moov is not None else None
    out["ok"] = True
    return out


def check_videos(root: os.PathLike, annotations: Optional[Mapping] = None, *, videos: Any = "all",
                 videos_dir: Optional[os.PathLike] = None) -> Dict[str, Optional[str]]:
    """{"01": None (fine) or the problem} for every video the (selected) annotations use."""
    root = Path(root)
    videos_dir = Path(videos_dir) if videos_dir is not None else root / "whole_videos"
    if annotations is None:
        annotations = load_annotations(root / "final_annotations_dict.pkl")
    selected = parse_videos(videos)
    check_videos_annotated(selected, annotations)
    last_needed: Dict[int, Tuple[int, Tuple[int, int]]] = {}
    for key, value in annotations.items():
        if selected is not None and key[0] not in selected:
            continue
        if key[0] not in last_needed or value["end_frame"] > last_needed[key[0]][0]:
            last_needed[key[0]] = (value["end_frame"], key)
    problems: Dict[str, Optional[str]] = {}
    for video in sorted(last_needed):
        info = inspect_mp4(videos_dir / f"{video:02d}.mp4")
        problem = info["error"]
        end, key = last_needed[video]
        if problem is None and info["frames"] and end > info["frames"]:
            problem = (f"{videos_dir / f'{video:02d}.mp4'} has {info['frames']} frames but clip {key} "
                       f"ends at frame {end} (a shorter or different video)")
        problems[f"{video:02d}"] = problem
    return problems


def require_videos(root: os.PathLike, annotations: Optional[Mapping] = None, *, videos: Any = "all",
                   videos_dir: Optional[os.PathLike] = None, allow_missing: bool = False) -> Dict[str, Optional[str]]:
    """:func:`check_videos`, raising :class:`ExtractError` on any problem unless ``allow_missing``."""
    problems = check_videos(root, annotations, videos=videos, videos_dir=videos_dir)
    bad = {k: v for k, v in problems.items() if v}
    if bad and not allow_missing:
        raise ExtractError(
            f"{len(bad)} of {len(problems)} videos are missing or damaged: "
            + "; ".join(f"{k}: {v}" for k, v in bad.items())
            + ". Download them again (the download stage resumes and verifies), or leave them out "
              "with --set data.allow_missing=true.")
    return problems
