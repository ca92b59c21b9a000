"""A synthetic MTL-AQA set in the real layout, small enough for CI and learnable at 64 px.

``generate(root)`` writes what the download stage would bring, in the same places::

    root/whole_videos/01.mp4 ...         # competition videos (mp4v), named as the real 15 are
    root/final_annotations_dict.pkl      # {(video_num, clip_idx): {start_frame, end_frame, ...}}
    root/train_split_0.pkl               # [(video_num, clip_idx), ...]
    root/test_split_0.pkl
    root/SYNTHETIC.json, root/README.txt # say loudly that this is not MTL-AQA

Each video is a run of dives separated by unannotated "broadcast" filler frames. In a dive a diver
stands on a board, falls to the water turning ``k`` somersaults and enters with a splash:

* difficulty (1.5-4.1, step 0.1) sets how high the board is (a tower drawn in every frame) and the
  number of somersaults ``k`` (1-4);
* execution (the mean judge mark, 0-10 in steps of 1/6) sets the splash: the worse the dive, the
  wider and taller the white splash, which stays visible for the last third of the clip;
* final_score = difficulty x 3 x execution (as the real sum of three judges times the difficulty),
  capped at 104.5 like the real scores.

Both cues are big, static or slowly varying shapes, so they survive resizing to 64 px and any of the
frame sampling methods. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from hpc_jobs.fsutil import atomic_write_json
from .annotations import VIDEO_NUMS, dump_pickle
from .errors import DivingDataError

MARKER = "SYNTHETIC.json"
README = "README.txt"
FORMAT_VERSION = 1

#: named sizes; ``generate(root, preset="tiny")`` (keyword arguments override a preset)
PRESETS: Dict[str, Dict[str, Any]] = {
    # a few seconds: unit tests
    "tiny": dict(n_videos=3, clips_per_video=6, frames_per_clip=(16, 24), filler_frames=(4, 8)),
    # the default: CI and `launch.py diving` on a laptop (a tiny TimeSformer learns it in minutes)
    "ci": dict(n_videos=6, clips_per_video=16, frames_per_clip=(20, 36), filler_frames=(8, 20)),
    # all 15 video names, more clips
    "full": dict(n_videos=15, clips_per_video=20, frames_per_clip=(24, 48), filler_frames=(20, 60)),
    # extraction benchmarks: real MTL-AQA proportions (clips of 55-120 frames, ~85% of the frames
    # unannotated; the real set annotates ~10%); pass size=(640, 360) for the real frame size
    "sparse": dict(n_videos=6, clips_per_video=10, frames_per_clip=(55, 120), filler_frames=(300, 600)),
}
DEFAULT_PRESET = "ci"

_STAND, _FLIGHT = 0.2, 0.45  # fractions of a clip: standing on the board, then in the air; rest = splash
_MAX_SCORE = 104.5


@dataclass(frozen=True)
class DiveSpec:
    """Everything needed to draw one clip (and its annotation)."""

    video_num: int
    clip_idx: int
    start_frame: int  # 1-based frame number (as ffmpeg's %06d.jpg numbering)
    n_frames: int
    difficulty: float
    judge_sum: float  # sum of the three judges' marks, 0-30 in steps of 0.5
    somersaults: int
    jitter_x: int
    tint: int

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.n_frames - 1

    @property
    def execution(self) -> float:
        return self.judge_sum / 3.0

    @property
    def final_score(self) -> float:
        return round(self.difficulty * self.judge_sum, 2)


def is_synthetic(root: os.PathLike) -> bool:
    """True when ``root`` holds a set written by :func:`generate` (its marker file is there)."""
    return (Path(root) / MARKER).is_file()


def synthetic_info(root: os.PathLike) -> Optional[Dict[str, Any]]:
    """The parameters recorded in the marker, or None for a real data root."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _resolve_params(preset: Optional[str], overrides: Dict[str, Any]) -> Dict[str, Any]:
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise DivingDataError(f"synthetic preset {name!r} is unknown; choose one of "
                              f"{', '.join(PRESETS)}")
    params = dict(PRESETS[name])
    params.update({k: v for k, v in overrides.items() if v is not None})
    params["preset"] = name
    return params


def plan_dives(n_videos: int, clips_per_video: int, frames_per_clip: Tuple[int, int],
               filler_frames: Tuple[int, int], seed: int) -> Tuple[Dict[int, List[DiveSpec]], Dict[int, int]]:
    """Decide every dive (and each video's length) from the seed, before drawing anything."""
    if not 1 <= n_videos <= len(VIDEO_NUMS):
        raise DivingDataError(f"n_videos={n_videos}: MTL-AQA has {len(VIDEO_NUMS)} videos; choose 1-15")
    if clips_per_video < 1:
        raise DivingDataError(f"clips_per_video={clips_per_video}: need at least 1")
    lo, hi = frames_per_clip
    if not 8 <= lo <= hi:
        raise DivingDataError(f"frames_per_clip={frames_per_clip}: need 8 <= min <= max (a dive needs "
                              "frames to stand, fly and splash)")
    rng = np.random.default_rng(seed)
    plans: Dict[int, List[DiveSpec]] = {}
    lengths: Dict[int, int] = {}
    for video in VIDEO_NUMS[:n_videos]:
        pos = int(rng.integers(filler_frames[0], filler_frames[1] + 1))  # 0-based frame index
        dives = []
        for clip in range(1, clips_per_video + 1):
            n = int(rng.integers(lo, hi + 1))
            difficulty = round(int(rng.integers(15, 42)) / 10.0, 1)
            execution = float(rng.uniform(0.5, 9.8))
            judge_sum = min(round(execution * 3 * 2) / 2, 30.0)
            judge_sum = min(judge_sum, math.floor(_MAX_SCORE / difficulty * 2) / 2)
            somersaults = 1 + int(round((difficulty - 1.5) / 2.6 * 3))
            dives.append(DiveSpec(video, clip, pos + 1, n, difficulty, judge_sum, somersaults,
                                  int(rng.integers(-3, 4)), int(rng.integers(-12, 13))))
            pos += n + int(rng.integers(filler_frames[0], filler_frames[1] + 1))
        plans[video] = dives
        lengths[video] = pos
    return plans, lengths


def _annotation(spec: DiveSpec, rng: np.random.Generator) -> Dict[str, Any]:
    return {
        "primary_view": 0,
        "start_frame": spec.start_frame,
        "end_frame": spec.end_frame,
        "position": int(rng.integers(0, 3)),
        "difficulty": float(spec.difficulty),
        "armstand": int(rng.random() < 0.1),
        "rotation_type": int(rng.integers(0, 4)),
        "ss_no": min(9, 2 * spec.somersaults + int(rng.integers(0, 2))),
        "tw_no": int(rng.integers(0, 5)),
        "final_score": float(spec.final_score),
    }


class _Painter:
    """Draws frames of one video at (W, H); all geometry scales with the frame size."""

    def __init__(self, size: Tuple[int, int], video_seed: int):
        import cv2  # imported here so that `import data.diving` stays cheap

        self.cv2 = cv2
        self.W, self.H = size
        rng = np.random.default_rng(video_seed)
        self.rng = rng
        self.water_y = int(round(0.80 * self.H))
        sky = np.array([150, 115, 85], float) + rng.integers(-20, 21, 3)
        wall = np.linspace(0.75, 1.0, self.water_y)[:, None, None] * sky[None, None, :]
        base = np.empty((self.H, self.W, 3), np.float32)
        base[: self.water_y] = wall
        water = np.array([170, 95, 25], float) + rng.integers(-15, 16, 3)
        base[self.water_y:] = water
        self.base = base.clip(0, 255).astype(np.uint8)
        self.lw = max(1, round(self.H / 36))

    # geometry of a dive ------------------------------------------------------------------------
    def board_y(self, spec: DiveSpec) -> int:
        fall = self.H * (0.15 + 0.45 * (spec.difficulty - 1.5) / 2.6)  # board top stays >= 0.2 H
        return int(round(self.water_y - fall))

    def background(self, spec: DiveSpec) -> np.ndarray:
        cv2, W = self.cv2, self.W
        img = (self.base.astype(np.int16) + spec.tint).clip(0, 255).astype(np.uint8)
        by = self.board_y(spec)
        x0, x_tip = int(0.28 * W) + spec.jitter_x, int(0.47 * W) + spec.jitter_x
        # tower (dark) and board (light): the board height is the difficulty cue in every frame
        cv2.rectangle(img, (x0, by), (x0 + max(2, W // 32), self.water_y), (90, 90, 100), -1)
        cv2.rectangle(img, (x0, by), (x_tip, by + self.lw), (235, 235, 235), -1)
        return img

    def diver(self, img: np.ndarray, cx: float, cy: float, angle_deg: float) -> None:
        cv2 = self.cv2
        length, width = max(6.0, 0.14 * self.H), max(2.0, self.H / 24)
        box = cv2.boxPoints(((cx, cy), (width, length), angle_deg))
        cv2.fillConvexPoly(img, np.round(box).astype(np.int32), (60, 130, 235), cv2.LINE_AA)
        a = math.radians(angle_deg)
        hx, hy = cx + math.sin(a) * length / 2, cy - math.cos(a) * length / 2  # head end
        cv2.circle(img, (int(round(hx)), int(round(hy))), max(1, int(width * 0.8)), (40, 230, 255), -1,
                   cv2.LINE_AA)

    def splash(self, img: np.ndarray, cx: float, spec: DiveSpec, s: float, drops: np.ndarray) -> None:
        cv2 = self.cv2
        bad = 1.0 - min(max(spec.execution / 10.0, 0.0), 1.0)
        grow = min(1.0, (s + 0.15) / 0.35) * (1.0 - 0.25 * s)
        half_w = self.W * (0.015 + 0.20 * bad) * grow
        height = self.H * (0.03 + 0.34 * bad) * grow
        center = (int(round(cx)), self.water_y)
        cv2.ellipse(img, center, (max(1, int(round(half_w))), max(1, int(round(height)))), 0, 180, 360,
                    (245, 245, 245), -1, cv2.LINE_AA)
        cv2.ellipse(img, center, (max(1, int(round(half_w * 1.3))), max(1, int(round(height * 0.25)))),
                    0, 0, 180, (230, 230, 225), -1, cv2.LINE_AA)
        for dx, dy in drops:  # droplets scale with the splash
            p = (int(round(cx + dx * half_w * 1.4)), int(round(self.water_y - dy * height * 1.3)))
            cv2.circle(img, p, max(1, self.lw), (250, 250, 250), -1)

    def dive_frame(self, bg: np.ndarray, spec: DiveSpec, i: int, drops: np.ndarray) -> np.ndarray:
        img = bg.copy()
        n = spec.n_frames
        n_stand = max(2, int(round(_STAND * n)))
        n_flight = max(3, int(round(_FLIGHT * n)))
        length = max(6.0, 0.14 * self.H)
        by = self.board_y(spec)
        x_start = 0.45 * self.W + spec.jitter_x
        x_entry = 0.5 * self.W + spec.jitter_x
        y0 = by - length / 2
        if i < n_stand:
            self.diver(img, x_start, y0, 0.0)
        elif i < n_stand + n_flight:
            t = (i - n_stand + 1) / n_flight
            x = x_start + (x_entry - x_start) * t
            y = y0 + (self.water_y - y0) * t * t - 0.08 * self.H * math.sin(math.pi * t)
            self.diver(img, x, y, 360.0 * (spec.somersaults + 0.5) * t)
        else:
            s = (i - n_stand - n_flight) / max(1, n - n_stand - n_flight - 1)
            self.splash(img, x_entry, spec, s, drops)
        return img

    def filler_background(self, colour: np.ndarray) -> np.ndarray:
        """An unannotated 'broadcast' shot: a dark studio with a scoreboard banner."""
        img = np.empty((self.H, self.W, 3), np.uint8)
        img[...] = colour.reshape(1, 1, 3)
        self.cv2.rectangle(img, (int(0.05 * self.W), int(0.70 * self.H)),
                           (int(0.95 * self.W), int(0.9 * self.H)), (30, 160, 200), -1)
        return img

    def filler_frame(self, bg: np.ndarray, k: int) -> np.ndarray:
        img = bg.copy()
        x = int(0.08 * self.W) + (k * 3) % int(0.6 * self.W)
        self.cv2.rectangle(img, (x, int(0.70 * self.H) + 2), (x + max(4, self.W // 10), int(0.9 * self.H) - 2),
                           (240, 240, 240), -1)
        return img

    def noisy(self, img: np.ndarray) -> np.ndarray:
        """Sensor-like noise of +-5 levels, from a small deterministic bank (cheap at any size)."""
        if not hasattr(self, "_noise"):
            bank = self.rng.integers(-5, 6, (8,) + img.shape, dtype=np.int16)
            self._noise = [(np.maximum(b, 0).astype(np.uint8), np.maximum(-b, 0).astype(np.uint8)) for b in bank]
            self._k = 0
        pos, neg = self._noise[self._k % len(self._noise)]
        self._k += 1
        return self.cv2.subtract(self.cv2.add(img, pos), neg)  # saturating uint8 arithmetic


def _write_video(path: Path, painter: _Painter, dives: Sequence[DiveSpec], length: int, fps: float,
                 seed: int) -> None:
    cv2 = painter.cv2
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.mp4")  # cv2 picks the container by suffix
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (painter.W, painter.H))
    if not writer.isOpened():
        raise DivingDataError(f"OpenCV cannot write mp4v video to {tmp}: is opencv-python-headless "
                              "built with FFmpeg? (python -c 'import cv2; print(cv2.getBuildInformation())')")
    rng = np.random.default_rng(seed)
    try:
        pos = 0  # 0-based index of the next frame to write
        for spec in list(dives) + [None]:
            stop = length if spec is None else spec.start_frame - 1
            filler = painter.filler_background(rng.integers(20, 70, 3).astype(np.uint8))
            for k in range(stop - pos):
                writer.write(painter.noisy(painter.filler_frame(filler, k)))
            pos = stop
            if spec is None:
                break
            bg = painter.background(spec)
            drops = rng.uniform([-1, 0.2], [1, 1], size=(6, 2))
            for i in range(spec.n_frames):
                writer.write(painter.noisy(painter.dive_frame(bg, spec, i, drops)))
            pos += spec.n_frames
    except BaseException:
        writer.release()
        tmp.unlink(missing_ok=True)
        raise
    writer.release()
    os.replace(tmp, path)


def generate(root: os.PathLike, n_videos: Optional[int] = None, clips_per_video: Optional[int] = None,
             size: Tuple[int, int] = (128, 72), frames_per_clip: Optional[Tuple[int, int]] = None,
             seed: int = 0, *, preset: Optional[str] = None, filler_frames: Optional[Tuple[int, int]] = None,
             test_fraction: float = 0.25, fps: float = 25.0, overwrite: bool = False) -> Dict[str, Any]:
    """Write the synthetic MTL-AQA set under ``root`` (see the module doc); return a summary dict.

    ``preset`` (see :data:`PRESETS`: "tiny", "ci" = default, "full", "sparse") sets n_videos,
    clips_per_video, frames_per_clip and filler_frames; explicit arguments override it. ``size`` is
    (width, height) of the videos. Idempotent: a root that already holds the same complete synthetic
    set is left as it is (summary["reused"] is True); an unfinished or different synthetic set is
    replaced. A root holding anything else (real MTL-AQA files) is refused, never overwritten.
    """
    t0 = time.perf_counter()
    params = _resolve_params(preset, dict(n_videos=n_videos, clips_per_video=clips_per_video,
                                          frames_per_clip=frames_per_clip, filler_frames=filler_frames))
    W, H = int(size[0]), int(size[1])
    if W < 32 or H < 18:
        raise DivingDataError(f"size={size}: need at least 32x18 pixels")
    if not 0.0 < test_fraction < 1.0:
        raise DivingDataError(f"test_fraction={test_fraction}: must lie strictly between 0 and 1")
    record = {"format": FORMAT_VERSION, "generator": "data.diving.synthetic", "seed": int(seed),
              "size": [W, H], "fps": fps, "test_fraction": test_fraction,
              **{k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}}
    root = Path(root)
    existing = synthetic_info(root)
    if existing is not None and not overwrite and existing.get("complete"):
        if {k: v for k, v in existing.items() if k in record} == record:
            return {**existing, "root": str(root), "seconds": 0.0, "reused": True}
    real_files = [p for p in ("final_annotations_dict.pkl", "whole_videos") if (root / p).exists()]
    if existing is None and real_files:
        raise DivingDataError(
            f"{root} already holds {', '.join(real_files)} and no {MARKER}: it looks like real MTL-AQA "
            "data. Refusing to write synthetic data over it; choose another directory.")
    if existing is not None:  # another (or an unfinished) synthetic set: replace it wholesale
        for name in ("whole_videos", "whole_videos_frames"):
            shutil.rmtree(root / name, ignore_errors=True)

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MARKER, {**record, "complete": False}, mode=None, indent=2)  # an interrupted run is redone
    plans, lengths = plan_dives(params["n_videos"], params["clips_per_video"],
                                tuple(params["frames_per_clip"]), tuple(params["filler_frames"]), seed)
    videos_dir = root / "whole_videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    meta_rng = np.random.default_rng([seed, 1])
    annotations: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for video, dives in plans.items():
        painter = _Painter((W, H), video_seed=seed * 1000 + video)
        _write_video(videos_dir / f"{video:02d}.mp4", painter, dives, lengths[video], fps,
                     seed=seed * 1000 + video + 500)
        for spec in dives:
            annotations[(spec.video_num, spec.clip_idx)] = _annotation(spec, meta_rng)

    keys = sorted(annotations)
    order = np.random.default_rng([seed, 2]).permutation(len(keys))
    n_test = max(1, int(round(test_fraction * len(keys))))
    test = [keys[i] for i in order[:n_test]]
    train = [keys[i] for i in order[n_test:]]
    dump_pickle(annotations, root / "final_annotations_dict.pkl")
    dump_pickle(train, root / "train_split_0.pkl")
    dump_pickle(test, root / "test_split_0.pkl")
    (root / README).write_text(
        "SYNTHETIC DATA - this is NOT the MTL-AQA dataset.\n\n"
        "Written by data.diving.synthetic.generate() in the layout of the real MTL-AQA release so that\n"
        "the diving workflow can run end to end without the real videos. Each clip is a drawn diver\n"
        "falling from a board (higher board = higher difficulty) with a splash whose size grows as the\n"
        "execution gets worse; final_score = difficulty x 3 x execution. Scores measured on it say\n"
        "nothing about real diving videos.\n")
    seconds = round(time.perf_counter() - t0, 3)
    summary = {**record, "videos": [f"{v:02d}" for v in plans], "clips": len(keys), "train_clips": len(train),
               "test_clips": len(test), "frames": int(sum(lengths.values())),
               "annotated_frames": int(sum(s.n_frames for d in plans.values() for s in d)), "complete": True}
    atomic_write_json(root / MARKER, summary, mode=None, indent=2)  # written last: its presence means "complete"
    return {**summary, "root": str(root), "seconds": seconds, "reused": False}
