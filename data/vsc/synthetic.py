"""A synthetic VSC 2022 set in the real layout, small enough for CI, and DISC21-layout training
images beside it (the isc generator writes them).

``generate(root)`` writes::

    root/train/query/Q100000.mp4 ...       # queries: a distractor video with a copied segment spliced in
    root/train/reference/R100000.mp4 ...   # references: shots of a window panning over procedural pictures
    root/test/reference/R200000.mp4 ...    # noise: the same kind of videos, copied into no query
    root/train/train_matching_ground_truth.csv, root/train/*_metadata.csv, root/test/*_metadata.csv
    root/disc21/...                        # training images (data/isc/synthetic.py, DISC21 layout)
    root/SYNTHETIC.json, root/README.txt   # say loudly that this is not the VSC data

Every video (reference, noise, the query's own footage) is a sequence of shots, each a window
panning over its own procedural picture, cut to the next, so what a video shows changes over
time as in real footage: a copied segment has one place in its reference, which the temporal
localisation can find (a single slow pan looks alike everywhere, so any reference span would do).

A copied query: a segment of a reference (its frames one for one, so the same speed) goes
through one copy edit of the ISC kind (crop, colour, text, blur... ``data.isc.augment.query_edit``
with the same parameters on every frame), resized to the query's frame size, and replaces the
frames of a distractor video from a known offset; the ground truth records both spans in seconds.
Some references are copied into two queries (duplicates); some queries copy nothing
(distractors). Everything is a pure function of the seed; a finished set (its marker matches) is
reused as it is.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import cv2
import numpy as np

from data.isc import augment
from data.isc import synthetic as disc21

MARKER = "SYNTHETIC.json"
FORMAT_VERSION = 2  # 2: videos are shots of several pictures (1: one pan per video)

PRESETS: Dict[str, Dict[str, Any]] = {
    # unit tests: a second or two
    "micro": dict(references=4, queries=4, copied=3, noise=2, fps=4, seconds=(4, 6), segment=(2, 3), shot=(1.5, 3),
                  width=64, height=48, picture=96, edits="moderate", disc21="micro"),
    # the tiny preset's pipeline (CI, the dev cluster, a laptop)
    "tiny": dict(references=20, queries=36, copied=24, noise=20, fps=4, seconds=(6, 10), segment=(2.5, 4.5),
                 shot=(1.5, 3), width=96, height=80, picture=160, edits="moderate", disc21="tiny"),
    # a larger demo for a GPU
    "small": dict(references=200, queries=300, copied=150, noise=200, fps=8, seconds=(10, 30), segment=(3, 10),
                  shot=(2, 5), width=224, height=168, picture=320, edits="strong", disc21="small"),
}
DEFAULT_PRESET = "tiny"
FIRST_ID = {"query": 100000, "reference": 100000, "noise": 200000}


def _params(preset: str, overrides: Dict[str, Any], seed: int) -> Dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"synthetic preset '{preset}' is unknown: use one of {', '.join(PRESETS)}")
    params = {**PRESETS[preset], **overrides, "seed": int(seed), "format": FORMAT_VERSION}
    params["seconds"], params["segment"] = list(params["seconds"]), list(params["segment"])
    params["shot"] = list(params["shot"])
    if not 0 <= params["copied"] <= params["queries"]:
        raise ValueError(f"{params['copied']} copied queries out of {params['queries']}")
    if params["segment"][1] > params["seconds"][0]:
        raise ValueError(f"segments up to {params['segment'][1]} s do not fit videos of {params['seconds'][0]} s")
    return params


def pan_video(picture: np.ndarray, rng: np.random.Generator, frames: int, width: int, height: int) -> np.ndarray:
    """``frames`` RGB frames of a window (60-80% of the picture) moving in a straight line across it."""
    side = picture.shape[0]
    win = int(side * rng.uniform(0.6, 0.8))
    start, end = rng.integers(0, side - win + 1, size=2), rng.integers(0, side - win + 1, size=2)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        t = i / max(1, frames - 1)
        x, y = (start * (1 - t) + end * t).astype(int)
        out[i] = cv2.resize(picture[y:y + win, x:x + win], (width, height), interpolation=cv2.INTER_AREA)
    return out


def shot_video(rng: np.random.Generator, frames: int, width: int, height: int, side: int,
               shot: tuple, fps: float) -> np.ndarray:
    """``frames`` RGB frames: shots of ``shot`` seconds (uniform in the range), each a
    :func:`pan_video` over a new procedural picture of ``side`` px."""
    out, done = [], 0
    while done < frames:
        n = min(frames - done, max(1, int(round(rng.uniform(*shot) * fps))))
        out.append(pan_video(disc21.procedural_image(rng, side), rng, n, width, height))
        done += n
    return np.concatenate(out)


def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """An mp4 (MPEG-4 part 2, which every OpenCV build writes), to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {tmp} (mp4v)")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    os.replace(tmp, path)


def copy_edit(segment: np.ndarray, rng: np.random.Generator, background: np.ndarray, strength: str,
              width: int, height: int) -> np.ndarray:
    """One ISC-style copy edit, the same on every frame (each frame is edited from the same RNG state)."""
    state = rng.bit_generator.state
    out = np.empty((len(segment), height, width, 3), np.uint8)
    for i, frame in enumerate(segment):
        frame_rng = np.random.default_rng()
        frame_rng.bit_generator.state = state
        edited, _ = augment.query_edit(frame, frame_rng, background, strength=strength)
        out[i] = cv2.resize(edited, (width, height), interpolation=cv2.INTER_AREA)
    rng.bit_generator.state = frame_rng.bit_generator.state if len(segment) else state
    return out


def _write_metadata(path: Path, rows: List[Dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["video_id", "duration_sec", "frames_per_sec", "width", "height"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def is_complete(root: Path, params: Optional[Dict[str, Any]] = None) -> bool:
    marker = Path(root) / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return params is None or data.get("params") == params


def generate(root: str | os.PathLike, preset: str = DEFAULT_PRESET, seed: int = 0, force: bool = False,
             **overrides: Any) -> Dict[str, Any]:
    """Write the synthetic set under ``root`` (idempotent: a complete set with the same parameters
    is kept); returns a summary."""
    from .matches import Match, write_matches

    root = Path(root)
    params = _params(preset, overrides, seed)
    if not force and is_complete(root, params):
        return {**json.loads((root / MARKER).read_text())["summary"], "reused": True}
    started = time.monotonic()
    for name in ("train", "test"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    master = np.random.default_rng(params["seed"])
    streams = {name: np.random.default_rng(s) for name, s in
               zip(("ref", "query", "noise", "edit"), master.integers(0, 2**63, size=4))}
    fps, width, height, side = params["fps"], params["width"], params["height"], params["picture"]

    def video(rng: np.random.Generator) -> np.ndarray:
        frames = int(round(rng.uniform(*params["seconds"]) * fps))
        return shot_video(rng, frames, width, height, side, params["shot"], fps)

    def meta(video_id: str, frames: np.ndarray) -> Dict[str, Any]:
        return {"video_id": video_id, "duration_sec": f"{len(frames) / fps:.3f}", "frames_per_sec": fps,
                "width": width, "height": height}

    refs, metadata = [], {"reference": [], "query": [], "noise": []}
    for i in range(params["references"]):
        frames = video(streams["ref"])
        video_id = f"R{FIRST_ID['reference'] + i:06d}"
        write_video(root / "train" / "reference" / f"{video_id}.mp4", frames, fps)
        refs.append((video_id, frames))
        metadata["reference"].append(meta(video_id, frames))
    for i in range(params["noise"]):
        frames = video(streams["noise"])
        video_id = f"R{FIRST_ID['noise'] + i:06d}"
        write_video(root / "test" / "reference" / f"{video_id}.mp4", frames, fps)
        metadata["noise"].append(meta(video_id, frames))

    rng, edit_rng = streams["query"], streams["edit"]
    copied = np.zeros(params["queries"], bool)
    copied[rng.choice(params["queries"], size=params["copied"], replace=False)] = True
    # every reference once, then again (duplicates: one reference copied into two queries)
    sources = list(rng.permutation(len(refs))) * (params["copied"] // max(1, len(refs)) + 1)
    truth: List[Match] = []
    for i in range(params["queries"]):
        frames = video(rng)
        video_id = f"Q{FIRST_ID['query'] + i:06d}"
        if copied[i]:
            ref_id, ref_frames = refs[int(sources.pop(0))]
            n = min(len(ref_frames), len(frames), int(round(rng.uniform(*params["segment"]) * fps)))
            r0 = int(rng.integers(0, len(ref_frames) - n + 1))
            q0 = int(rng.integers(0, len(frames) - n + 1))
            background = disc21.procedural_image(edit_rng, max(width, height))
            frames[q0:q0 + n] = copy_edit(ref_frames[r0:r0 + n], edit_rng, background, params["edits"], width, height)
            truth.append(Match(video_id, ref_id, q0 / fps, (q0 + n) / fps, r0 / fps, (r0 + n) / fps))
        write_video(root / "train" / "query" / f"{video_id}.mp4", frames, fps)
        metadata["query"].append(meta(video_id, frames))

    _write_metadata(root / "train" / "train_query_metadata.csv", metadata["query"])
    _write_metadata(root / "train" / "train_reference_metadata.csv", metadata["reference"])
    _write_metadata(root / "test" / "test_reference_metadata.csv", metadata["noise"])
    write_matches(root / "train" / "train_matching_ground_truth.csv", truth, with_score=False)
    training = disc21.generate(root / "disc21", preset=params["disc21"], seed=params["seed"])
    (root / "README.txt").write_text(
        "SYNTHETIC data in the VSC 2022 layout (and DISC21 training images), written by data/vsc/synthetic.py.\n"
        "It is NOT the Video Similarity Challenge data set; scores on it say nothing about VSC.\n")
    summary = {"queries": params["queries"], "copied": len(truth), "references": len(refs), "noise": params["noise"],
               "training_images": training.get("training"), "seconds": round(time.monotonic() - started, 2)}
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"params": params, "summary": summary}, indent=1))
    os.replace(tmp, root / MARKER)  # the marker last: its presence means the set is whole
    return {**summary, "reused": False}
