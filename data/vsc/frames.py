"""Uniformly spaced frames of a video, with their times, decoded with OpenCV.

``sample_frames(path, n)`` splits the video into ``n`` equal spans and takes the frame at the
middle of each (all frames when it has fewer); a frame's time is its index / fps, in seconds,
the time axis of the matching track's segments.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np


class Frames(NamedTuple):
    images: np.ndarray    # (n, H, W, 3) RGB uint8
    times: np.ndarray     # (n,) seconds from the start
    duration: float       # seconds
    step: float           # seconds between two sampled frames


def uniform_indices(frame_count: int, num_frames: int) -> np.ndarray:
    """The middle frame of each of ``num_frames`` equal spans of ``frame_count`` frames."""
    if frame_count <= 0:
        return np.zeros(0, dtype=np.int64)
    n = min(int(num_frames), frame_count)
    return np.minimum(((np.arange(n) + 0.5) * frame_count / n).astype(np.int64), frame_count - 1)


def sample_frames(path: str | Path, num_frames: int) -> Frames:
    """Read the video once, keeping ``num_frames`` uniformly spaced frames (decoding in order is
    exact where seeking in an mp4 is not)."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OSError(f"OpenCV cannot open the video {path}")
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS)) or 25.0
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        capture.release()
    if not frames:
        raise OSError(f"{path}: no frame could be decoded")
    index = uniform_indices(len(frames), num_frames)
    images = np.stack([cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB) for i in index])
    duration = len(frames) / fps
    return Frames(images, index / fps, duration, duration / len(index))
