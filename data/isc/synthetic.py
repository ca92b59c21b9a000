"""A synthetic DISC21 (ISC 2021) set in the real layout, small enough for CI.

``generate(root)`` writes what the download stage would bring, where it would bring it::

    root/reference_images/R000000.jpg ...   # the database
    root/training_images/T000000.jpg ...    # unrelated images (self-supervised training, NES)
    root/query_images/Q00000.jpg ...        # phase-1 queries (their ground truth trains v107)
    root/public_ground_truth.csv            # query_id,reference_id (empty: a distractor query)
    root/query_images_phase2/Q00150.jpg ... # held-out queries: extract, post-process, eval
    root/phase2_ground_truth.csv
    root/SYNTHETIC.json, root/README.txt    # say loudly that this is not DISC21

References, training images and distractor sources are procedural pictures (a gradient, noise or
stripe background under a handful of coloured shapes, some textured), each distinct. A query with a
reference is an edit of that reference: a crop of part of its area, then a few of colour jitter,
text, emoji, pasted onto or under another picture, blur, JPEG, rotation, flip, pixelisation,
perspective (``augment.QUERY_EDITS``); a distractor query is the same kind of edit of a picture that
is in no set. The ``tiny`` preset edits at ``moderate`` strength (a 40-90% crop and 1-2 edits), which
a small network trained from scratch on a CPU for a few minutes learns while an untrained one
scores near zero (crops and colour changes defeat its colour-layout statistics); ``small`` edits at
DISC21-like ``strong`` strength (30-80% crops, 2-4 edits, hue shifts, grayscale) for GPU runs.
Everything is a pure function of the seed; a finished set (its marker matches) is reused as it is.
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

from . import augment

MARKER = "SYNTHETIC.json"
README = "README.txt"
FORMAT_VERSION = 1

#: named sizes (keyword arguments of ``generate`` override a preset)
PRESETS: Dict[str, Dict[str, Any]] = {
    # unit tests: seconds
    "micro": dict(references=40, training=60, queries=20, query_positives=12, phase2_queries=20,
                  phase2_positives=12, size=96, edits="moderate"),
    # the tiny preset's pipeline (CI, the dev cluster, a laptop): a few seconds to write
    "tiny": dict(references=300, training=600, queries=120, query_positives=80, phase2_queries=150,
                 phase2_positives=100, size=128, edits="moderate"),
    # a larger demo for a real GPU
    "small": dict(references=5000, training=10000, queries=1000, query_positives=500, phase2_queries=2000,
                  phase2_positives=1000, size=224, edits="strong"),
}
DEFAULT_PRESET = "tiny"


# -- procedural pictures -------------------------------------------------------------------------
def _color(rng: np.random.Generator) -> tuple:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(1e-6, np.ptp(t))
        a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == 1:  # radial gradient
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / 0.8, 0, 1)
        a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == 2:  # low-frequency colour noise
        cells = int(rng.integers(2, 6))
        grid = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.float32)
        img = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    else:  # stripes
        period = rng.uniform(0.05, 0.25)
        angle = rng.uniform(0, np.pi)
        t = (np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period) > 0).astype(np.float32)
        a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
        img = a * (1 - t[..., None]) + b * t[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A fill pattern for a shape: checker or stripes in two colours."""
    yy, xx = np.mgrid[0:size, 0:size]
    step = int(rng.integers(3, 12)) * size // 128 + 2
    if rng.random() < 0.5:
        t = ((xx // step + yy // step) % 2).astype(np.float32)
    else:
        t = (((xx + yy) // step) % 2).astype(np.float32)
    a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
    return (a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8)


def procedural_image(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A distinctive RGB picture: a background under 3-8 shapes (circles, rectangles, polygons,
    ellipses, rings, thick lines), some filled with a texture."""
    img = _background(rng, size)
    for _ in range(int(rng.integers(3, 9))):
        mask = np.zeros((size, size), np.uint8)
        kind = int(rng.integers(6))
        c = rng.integers(0, size, size=2)
        r = int(rng.uniform(0.06, 0.3) * size)
        if kind == 0:
            cv2.circle(mask, (int(c[0]), int(c[1])), r, 255, -1)
        elif kind == 1:
            d = rng.integers(r // 2 + 1, 2 * r + 2, size=2)
            cv2.rectangle(mask, (int(c[0]), int(c[1])), (int(c[0] + d[0]), int(c[1] + d[1])), 255, -1)
        elif kind == 2:
            pts = (c + rng.integers(-r, r + 1, size=(int(rng.integers(3, 7)), 2))).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255)
        elif kind == 3:
            axes = (r, max(2, int(r * rng.uniform(0.3, 1.0))))
            cv2.ellipse(mask, (int(c[0]), int(c[1])), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        elif kind == 4:
            cv2.circle(mask, (int(c[0]), int(c[1])), r, 255, max(2, r // 3))
        else:
            end = rng.integers(0, size, size=2)
            cv2.line(mask, (int(c[0]), int(c[1])), (int(end[0]), int(end[1])), 255, max(2, size // 24))
        fill = _texture(rng, size) if rng.random() < 0.35 else np.full((size, size, 3), _color(rng), np.uint8)
        sel = mask > 0
        img[sel] = fill[sel]
    return img


# -- the set -------------------------------------------------------------------------------------
def _params(preset: str, overrides: Dict[str, Any], seed: int) -> Dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"synthetic preset '{preset}' is unknown: use one of {', '.join(PRESETS)}")
    params = {**PRESETS[preset], **overrides, "seed": int(seed), "format": FORMAT_VERSION}
    for phase in ("query", "phase2"):
        n = params["queries" if phase == "query" else "phase2_queries"]
        pos = params["query_positives" if phase == "query" else "phase2_positives"]
        if not 0 <= pos <= n:
            raise ValueError(f"{phase}: {pos} queries with a reference out of {n}")
        if pos > params["references"]:
            raise ValueError(f"{phase}: {pos} copied queries need as many distinct references, "
                             f"but there are {params['references']}")
    return params


def is_complete(root: Path, params: Optional[Dict[str, Any]] = None) -> bool:
    marker = Path(root) / MARKER
    if not marker.exists():
        return False
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return params is None or data.get("params") == params


def _write_images(folder: Path, prefix: str, digits: int, start: int, images: List[np.ndarray]) -> List[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i, image in enumerate(images):
        ident = f"{prefix}{start + i:0{digits}d}"
        augment.write_jpeg(folder / f"{ident}.jpg", image, quality=90)
        ids.append(ident)
    return ids


def _write_gt(path: Path, rows: List[tuple]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query_id", "reference_id"])
        writer.writerows(rows)
    os.replace(tmp, path)


def generate(root: str | os.PathLike, preset: str = DEFAULT_PRESET, seed: int = 0, force: bool = False,
             **overrides: Any) -> Dict[str, Any]:
    """Write the synthetic set under ``root`` (idempotent: a complete set with the same parameters
    is kept); returns a summary. A half-written set (no marker) is removed and written again."""
    root = Path(root)
    params = _params(preset, overrides, seed)
    if not force and is_complete(root, params):
        return {**json.loads((root / MARKER).read_text())["summary"], "reused": True}
    started = time.monotonic()
    for name in ("reference_images", "training_images", "query_images", "query_images_phase2"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    size = int(params["size"])
    master = np.random.default_rng(params["seed"])
    streams = {name: np.random.default_rng(s) for name, s in
               zip(("ref", "train", "distract", "bg", "q1", "q2"), master.integers(0, 2**63, size=6))}

    refs = [procedural_image(streams["ref"], size) for _ in range(params["references"])]
    ref_ids = _write_images(root / "reference_images", "R", 6, 0, refs)
    train = [procedural_image(streams["train"], size) for _ in range(params["training"])]
    _write_images(root / "training_images", "T", 6, 0, train)

    # which references the copied queries come from: distinct within a phase, phases may share
    summary: Dict[str, Any] = {"references": len(refs), "training": len(train)}
    first_id = 0
    for phase, folder, gt_name, n_key, pos_key in (
            ("q1", "query_images", "public_ground_truth.csv", "queries", "query_positives"),
            ("q2", "query_images_phase2", "phase2_ground_truth.csv", "phase2_queries", "phase2_positives")):
        rng = streams[phase]
        n, n_pos = params[n_key], params[pos_key]
        sources = rng.choice(len(refs), size=n_pos, replace=False)
        is_copy = np.zeros(n, bool)
        is_copy[rng.choice(n, size=n_pos, replace=False)] = True
        images, rows, edits = [], [], {}
        src_iter = iter(sources)
        for qi in range(n):
            background = procedural_image(streams["bg"], size)
            if is_copy[qi]:
                r = int(next(src_iter))
                source, ref_id = refs[r], ref_ids[r]
            else:  # a distractor: the same kind of edit of a picture in no set
                source, ref_id = procedural_image(streams["distract"], size), ""
            image, names = augment.query_edit(source, rng, background, strength=params["edits"])
            images.append(image)
            rows.append((f"Q{first_id + qi:05d}", ref_id))
            for name in names:
                edits[name] = edits.get(name, 0) + 1
        _write_images(root / folder, "Q", 5, first_id, images)
        _write_gt(root / gt_name, rows)
        summary[folder] = {"queries": n, "with_reference": n_pos, "edits": edits}
        first_id += n

    (root / README).write_text(
        "SYNTHETIC data in the DISC21 (ISC 2021) layout, written by data/isc/synthetic.py.\n"
        "It is NOT the Image Similarity Challenge data set; scores on it say nothing about DISC21.\n")
    summary["seconds"] = round(time.monotonic() - started, 2)
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"params": params, "summary": summary}, indent=1))
    os.replace(tmp, root / MARKER)  # the marker last: its presence means the set is whole
    return {**summary, "reused": False}
