"""Model inputs from the layout: per-mouse normalisation, frame stacks, training windows and
whole-trial prediction.

A sample is a window of ``size`` frames ``start + step * arange(size)`` of one trial of one mouse:

- inputs ``(5, size, H, W)``: the video frames (resized to ``image_size`` when needed), then four
  constant planes: behaviour (pupil dilation, running speed) and pupil centre (x, y), each
  standardised with the mouse's own statistics;
- targets ``(sum of neurons, size)``: the mouse's responses in its rows, zeros elsewhere;
- mouse weights ``(mice,)``: 1 for the sample's mouse, 0 for the others. CutMix mixes them with
  the targets (``cutmix``), and distillation fills the zero rows with a teacher's predictions.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .layout import Mouse, trial_length


def mouse_stats(mouse: Mouse, trials: Sequence[int], max_trials: int = 32) -> Dict[str, list]:
    """Mean/std of the video, behaviour and pupil centre over (up to ``max_trials``) trials."""
    picked = list(trials)[:: max(1, len(trials) // max_trials)][:max_trials]
    video, behavior, pupil = [], [], []
    for t in picked:
        b = mouse.load("behavior", t)
        n = trial_length(b)
        video.append(mouse.load("videos", t)[..., :n].astype(np.float64).ravel())
        behavior.append(b[:, :n])
        pupil.append(mouse.load("pupil_center", t)[:, :n])
    v = np.concatenate(video)
    b = np.concatenate(behavior, axis=1)
    p = np.concatenate(pupil, axis=1)
    return {"video_mean": float(v.mean()), "video_std": float(v.std() or 1.0),
            "behavior_mean": b.mean(1).tolist(), "behavior_std": np.where(b.std(1) > 0, b.std(1), 1.0).tolist(),
            "pupil_mean": p.mean(1).tolist(), "pupil_std": np.where(p.std(1) > 0, p.std(1), 1.0).tolist()}


def window_frames(start: int, size: int, step: int) -> np.ndarray:
    return start + step * np.arange(size)


def window_starts(length: int, size: int, step: int) -> List[int]:
    """Window starts whose frames cover every frame of a trial of ``length`` at least once."""
    span = step * (size - 1) + 1
    if length < span + step - 1:  # every frame must sit in some window: step windows side by side
        raise ValueError(f"a trial of {length} frames is shorter than one window ({size} frames, step {step}) "
                         f"shifted {step - 1} times: trials need at least {span + step - 1} frames")
    last = length - span
    covered = np.zeros(length, dtype=bool)
    starts: List[int] = []
    for frame in range(length):
        if covered[frame]:
            continue
        start = frame if frame <= last else frame - step * int(np.ceil((frame - last) / step))
        starts.append(start)
        covered[window_frames(start, size, step)] = True
    return starts


class TrialReader:
    """Standardised, resized frame stacks of one mouse's trials (arrays cached per trial)."""

    def __init__(self, mouse: Mouse, stats: Dict[str, list], image_size: Tuple[int, int], cache: int = 256) -> None:
        self.mouse, self.stats, self.image_size = mouse, stats, tuple(image_size)
        self._load = lru_cache(maxsize=cache)(self._load_trial)

    def _load_trial(self, trial: int):
        s = self.stats
        behavior = self.mouse.load("behavior", trial)
        n = trial_length(behavior)
        video = (self.mouse.load("videos", trial)[..., :n].astype(np.float32) - s["video_mean"]) / s["video_std"]
        video = np.nan_to_num(video).transpose(2, 0, 1)  # (T, H, W)
        if video.shape[1:] != self.image_size:
            video = _resize(video, self.image_size)
        planes = np.concatenate([
            (behavior[:, :n] - np.asarray(s["behavior_mean"])[:, None]) / np.asarray(s["behavior_std"])[:, None],
            (self.mouse.load("pupil_center", trial)[:, :n] - np.asarray(s["pupil_mean"])[:, None])
            / np.asarray(s["pupil_std"])[:, None]]).astype(np.float32)
        return np.ascontiguousarray(video), np.nan_to_num(planes), n

    def length(self, trial: int) -> int:
        return self._load(trial)[2]

    def inputs(self, trial: int, frames: np.ndarray) -> np.ndarray:
        """(5, len(frames), H, W) float32."""
        video, planes, _ = self._load(trial)
        h, w = self.image_size
        out = np.empty((5, len(frames), h, w), dtype=np.float32)
        out[0] = video[frames]
        out[1:] = planes[:, frames][:, :, None, None]
        return out

    def responses(self, trial: int) -> np.ndarray:
        n = self.length(trial)
        return self.mouse.load("responses", trial)[:, :n].astype(np.float32)


def _resize(video: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = F.interpolate(torch.from_numpy(video)[:, None], size=size, mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


class TrainWindows:
    """``epoch_size`` random windows per epoch: a mouse uniformly, then one of its training trials,
    then a start. The engine seeds numpy around each ``__getitem__`` from (seed, epoch, index), so
    an epoch's draws are reproducible and differ between epochs."""

    def __init__(self, readers: Sequence[TrialReader], trials: Sequence[Sequence[int]], size: int, step: int,
                 epoch_size: int) -> None:
        self.readers, self.trials = list(readers), [list(t) for t in trials]
        self.size, self.step, self.epoch_size = size, step, epoch_size
        self.neurons = [r.mouse.num_neurons for r in self.readers]
        self.offsets = np.concatenate([[0], np.cumsum(self.neurons)]).astype(int)
        empty = [r.mouse.name for r, t in zip(self.readers, self.trials) if not t]
        if empty:
            raise ValueError(f"no training trials for mice {empty}")

    def __len__(self) -> int:
        return self.epoch_size

    def __getitem__(self, index: int):
        import torch

        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        m = int(rng.integers(len(self.readers)))
        reader = self.readers[m]
        trial = self.trials[m][int(rng.integers(len(self.trials[m])))]
        span = self.step * (self.size - 1) + 1
        start = int(rng.integers(0, reader.length(trial) - span + 1))
        frames = window_frames(start, self.size, self.step)
        target = np.zeros((int(self.offsets[-1]), self.size), dtype=np.float32)
        target[self.offsets[m]:self.offsets[m + 1]] = reader.responses(trial)[:, frames]
        weights = np.zeros(len(self.readers), dtype=np.float32)
        weights[m] = 1.0
        return (torch.from_numpy(reader.inputs(trial, frames)), torch.from_numpy(np.nan_to_num(target)),
                torch.from_numpy(weights))


class TrialIndex:
    """(mouse, trial) pairs as a map-style dataset: what validation iterates over."""

    def __init__(self, pairs: Sequence[Tuple[int, int]]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        import torch

        return torch.tensor(self.pairs[index], dtype=torch.long)


def predict_trial(model, reader: TrialReader, mouse_slice: slice, trial: int, size: int, step: int, device,
                  batch_size: int = 16, autocast=None) -> np.ndarray:
    """The model's responses (neurons, length) over a whole trial: windows covering every frame,
    overlapping frames averaged."""
    import contextlib

    import torch

    length = reader.length(trial)
    starts = window_starts(length, size, step)
    total = np.zeros((mouse_slice.stop - mouse_slice.start, length), dtype=np.float64)
    count = np.zeros(length, dtype=np.float64)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        frames = [window_frames(s, size, step) for s in chunk]
        x = torch.from_numpy(np.stack([reader.inputs(trial, f) for f in frames])).to(device)
        with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            out = model(x)[:, mouse_slice].float().cpu().numpy()
        for o, f in zip(out, frames):
            total[:, f] += o
            count[f] += 1
    return (total / count).astype(np.float32)


def cutmix(inputs, targets, weights, mouse_slices: Sequence[slice], alpha: float, prob: float):
    """CutMix between each sample and its neighbour in the batch (``roll`` by one), with
    probability ``prob``: a box of the video (all frames and channels) comes from the partner;
    targets and mouse weights mix by the kept area ``lam``. A mouse's mixed target is the
    weight-averaged target of the samples that have it, so a sample without that mouse (weight 0)
    does not pull its target toward zero. Draws from torch's RNG (which the engine checkpoints)."""
    import torch

    if prob <= 0 or inputs.shape[0] < 2 or float(torch.rand(())) >= prob:
        return inputs, targets, weights
    lam = float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())
    h, w = inputs.shape[-2:]
    cut_h, cut_w = int(round(h * np.sqrt(1 - lam))), int(round(w * np.sqrt(1 - lam)))
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    y0, y1 = max(0, cy - cut_h // 2), min(h, cy + (cut_h + 1) // 2)
    x0, x1 = max(0, cx - cut_w // 2), min(w, cx + (cut_w + 1) // 2)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    partner = torch.roll(torch.arange(inputs.shape[0], device=inputs.device), 1)
    mixed = inputs.clone()
    mixed[..., y0:y1, x0:x1] = inputs[partner][..., y0:y1, x0:x1]
    return (mixed, *mix_targets(targets, weights, partner, lam, mouse_slices))


def mix_targets(targets, weights, partner, lam: float, mouse_slices: Sequence[slice]):
    """(targets, weights) of ``lam`` x own + ``1 - lam`` x partner, each mouse's targets averaged
    by its weights."""
    wa, wb = lam * weights, (1 - lam) * weights[partner]
    mixed_w = wa + wb
    out = targets.clone()
    for m, rows in enumerate(mouse_slices):
        denom = mixed_w[:, m].clamp_min(1e-12)[:, None, None]
        out[:, rows] = (wa[:, m, None, None] * targets[:, rows]
                        + wb[:, m, None, None] * targets[partner][:, rows]) / denom
    return out, mixed_w
