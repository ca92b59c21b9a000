"""A synthetic Sensorium set in the real per-mouse layout (``layout.py``).

Each mouse watches its own smooth random videos. Every neuron has a Gaussian receptive field
(centre, width, ON or OFF sign) over the frame; its drive is the field's dot product with the
frame (a little of the previous frame too), and its Poisson rate is ``r0 * exp(gain * z)``
scaled up with running speed (``z``: the standardised drive). Pupil dilation and centre are
smooth random walks. A model can learn all of it, so correlation rises with training; the
responses of the unlabeled splits are written too (the real set hides them), so the ensemble can
report a test correlation on synthetic data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from .layout import UNLABELED_SPLITS

PRESETS: Dict[str, Dict[str, Any]] = {
    # 2 mice, tens of neurons: the tiny preset's whole chain in minutes on 2 CPU cores
    "tiny": {"mice": (("synthetic-mouse-a", 40), ("synthetic-mouse-b", 30)), "labeled": 35, "unlabeled": 3,
             "frames": 64, "height": 16, "width": 32},
    # the real frame size and trial length, more trials
    "full": {"mice": (("synthetic-mouse-a", 80), ("synthetic-mouse-b", 60)), "labeled": 140, "unlabeled": 10,
             "frames": 300, "height": 36, "width": 64},
}
VERSION = 1


def _smooth(x: np.ndarray, sigma: Tuple[float, ...]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=sigma, mode="wrap")


def _walk(rng: np.random.Generator, n: int, frames: int, scale: float, smooth: float) -> np.ndarray:
    return _smooth(np.cumsum(rng.normal(0, scale, size=(n, frames)), axis=1), (0, smooth))


def generate(root: Path, preset: str = "tiny", seed: int = 0, **overrides: Any) -> Dict[str, Any]:
    """Write the set under ``root`` (idempotent: a complete set with the same parameters is kept)."""
    params = {**PRESETS[preset], **overrides}
    root = Path(root)
    stamp = root / "synthetic.json"
    record = {"version": VERSION, "preset": preset, "seed": seed,
              **{k: (list(map(list, v)) if k == "mice" else v) for k, v in params.items()}}
    if stamp.exists() and json.loads(stamp.read_text()) == record:
        return {**record, "generated": False}
    rng = np.random.default_rng(seed)
    for name, neurons in params["mice"]:
        _mouse(root / name, int(neurons), params, rng)
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(record))
    return {**record, "generated": True}


def _mouse(base: Path, neurons: int, p: Dict[str, Any], rng: np.random.Generator) -> None:
    frames, h, w = int(p["frames"]), int(p["height"]), int(p["width"])
    tiers = ["train"] * (p["labeled"] - p["labeled"] // 7) + ["oracle"] * (p["labeled"] // 7)
    for split in UNLABELED_SPLITS:
        tiers += [split] * p["unlabeled"]
    tiers = np.array(tiers)
    rng.shuffle(tiers)
    for sub in ("meta/trials", "meta/neurons", "data/videos", "data/behavior", "data/pupil_center", "data/responses"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    np.save(base / "meta/trials/tiers.npy", tiers)
    np.save(base / "meta/neurons/unit_ids.npy", np.arange(1, neurons + 1))
    # receptive fields: Gaussian, centre anywhere in the frame, ON or OFF
    cy, cx = rng.uniform(0, h, neurons), rng.uniform(0, w, neurons)
    sigma = rng.uniform(1.5, 3.0, neurons) * h / 16
    yy, xx = np.mgrid[0:h, 0:w]
    fields = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
                    / (2 * sigma[:, None, None] ** 2))
    fields *= rng.choice([-1.0, 1.0], neurons)[:, None, None] / fields.sum(axis=(1, 2), keepdims=True)
    np.save(base / "meta/neurons/cell_motor_coordinates.npy", np.stack([cx, cy, np.zeros(neurons)], 1))
    r0, gain = rng.uniform(0.5, 2.0, neurons), rng.uniform(0.8, 1.2, neurons)
    drive_scale = None
    short = {int(np.flatnonzero(tiers == "train")[-1])}  # one NaN-padded trial, as the real set has
    for trial, tier in enumerate(tiers):
        noise = rng.normal(size=(frames, h, w))
        video = _smooth(noise, (1.0, 1.5 * h / 16, 1.5 * h / 16))
        video = np.clip(128 + 60 * video / (video.std() + 1e-9), 0, 255)  # (T, H, W)
        drive = np.einsum("nhw,thw->nt", fields, (video - 128) / 60)
        drive[:, 1:] += 0.4 * drive[:, :-1]
        if drive_scale is None:
            drive_scale = drive.std(axis=1) + 1e-9
        z = drive / drive_scale[:, None]
        speed = np.abs(_walk(rng, 1, frames, 1.0, 3.0))[0]
        speed = speed / (speed.max() + 1e-9) * rng.uniform(0.2, 1.0)
        dilation = 1.0 + 0.2 * _walk(rng, 1, frames, 0.3, 3.0)[0]
        rate = r0[:, None] * np.exp(gain[:, None] * np.clip(z, -3, 3)) * (0.5 + 1.5 * speed[None])
        responses = rng.poisson(rate).astype(np.float32)
        behavior = np.stack([dilation, speed]).astype(np.float32)
        pupil = (np.array([[w / 2], [h / 2]]) + _walk(rng, 2, frames, 0.3, 3.0)).astype(np.float32)
        video = video.transpose(1, 2, 0).astype(np.float32)  # (H, W, T)
        if trial in short:
            cut = frames - frames // 8
            for arr in (video, behavior, pupil, responses):
                arr[..., cut:] = np.nan
        np.save(base / f"data/videos/{trial}.npy", video)
        np.save(base / f"data/behavior/{trial}.npy", behavior)
        np.save(base / f"data/pupil_center/{trial}.npy", pupil)
        np.save(base / f"data/responses/{trial}.npy", responses)
