"""MTL-AQA clips as a torch ``Dataset``, read from the extracted ``whole_videos_frames/NN/%06d.jpg``.

An item is ``(clip, target, final_score, key)``:

* ``clip``: float32 tensor ``[3, frame_num, spatial_size, spatial_size]`` (RGB, 0-1, or normalised
  with the seed's mean/std when ``normalize``);
* ``target``: float32 ``[final_score / difficulty / 30, difficulty]``, as the seed's model predicts
  (score = target[0] * target[1] * 30: :func:`decode_score`);
* ``final_score``: the float from the annotations; ``key``: ``(video_num, clip_idx)``.

Frame sampling (``frame_method``; n = frames in the clip, T = ``frame_num``, step = n / T), as the
seed's latest train.py does it:

* ``random``: T distinct frames drawn uniformly from the clip, sorted (with repeats if n < T);
* ``spaced_fixed``: ``start + int(i * step)``: fixed, evenly spaced (the default);
* ``spaced_varied``: evenly spaced, the whole comb shifted by one random offset in [0, step);
* ``spaced_fixed_new``: identical to ``spaced_varied`` in the seed's code (one shared offset); kept
  as a name so that configs written for the seed still run;
* ``spaced_varied_new``: each frame gets its own random offset in [0, step) within its segment.

Spatial pipeline (the seed: resize to 256x455, then random crop + flip when ``data_aug``, else a
plain resize to the square): here the intermediate size is proportional to ``spatial_size``
(``round(S * 256/224)`` x 16:9, i.e. 256x455 for S=224, 73x130 for S=64). Training clips with
``data_aug`` get one random crop and flip per clip (all frames alike); evaluation clips of an
augmented run get the centre crop (the seed augmented val/test too; evaluation here is
deterministic); without augmentation every frame is resized straight to S x S.

Randomness is a pure function of ``(seed, epoch, index)``: a requeued job that resumes at an epoch
draws the same frames and crops. Call :meth:`DivingClips.set_epoch` before each epoch (or pass
``(index, epoch)`` pairs as indices, which also works with persistent DataLoader workers).

Speed: JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``IMREAD_REDUCED_COLOR_*``) when the
target is that much smaller; the crop window is mapped back onto the decoded frame, so each frame is
resized once, straight to S x S; ``cache_mb`` keeps decoded frames in memory (per process, LRU).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import (Annotations, Key, check_disjoint, check_videos_annotated, load_annotations,
                          load_split, parse_videos)
from .errors import DivingDataError, FramesMissingError

FRAME_METHODS = ("random", "spaced_fixed", "spaced_varied", "spaced_fixed_new", "spaced_varied_new")
MEAN = (0.2719, 0.4617, 0.5961)
STD = (0.1870, 0.1881, 0.2604)
CROP_MODES = ("random", "center", "none")

_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_score(target: torch.Tensor) -> torch.Tensor:
    """Final score from a target or a prediction ``[..., 2]``: ``out0 * out1 * 30``."""
    return target[..., 0] * target[..., 1] * 30.0


def intermediate_size(spatial_size: int) -> Tuple[int, int]:
    """(height, width) clips are resized to before cropping: 256x455 for 224, proportional otherwise."""
    h = max(spatial_size, int(round(spatial_size * 256 / 224)))
    return h, max(h, int(round(h * 16 / 9)))


def sample_frame_numbers(start: int, end: int, frame_num: int, method: str,
                         rng: np.random.Generator) -> List[int]:
    """Frame numbers (within [start, end]) the clip is made of; see the module doc for the methods."""
    if method not in FRAME_METHODS:
        raise DivingDataError(f"frame_method={method!r} is unknown; choose one of {', '.join(FRAME_METHODS)}")
    if frame_num < 1:
        raise DivingDataError(f"frame_num={frame_num}: need at least 1 frame")
    n = end - start + 1
    if method == "random":
        picks = rng.choice(n, size=frame_num, replace=n < frame_num)
        out = sorted(int(p) + start for p in picks)
    else:
        step = n / frame_num
        i = np.arange(frame_num, dtype=np.float64)
        if method == "spaced_fixed":
            pos = i * step
        elif method in ("spaced_varied", "spaced_fixed_new"):
            pos = i * step + rng.random() * step
        else:  # spaced_varied_new
            pos = i * step + rng.random(frame_num) * step
        out = [start + int(p) for p in pos]
    return [min(max(f, start), end) for f in out]


class DivingClips(Dataset):
    """Clips ``keys`` of ``annotations`` read from ``frames_dir`` (see the module doc)."""

    def __init__(self, frames_dir: os.PathLike, annotations: Mapping[Key, Mapping[str, Any]],
                 keys: Sequence[Key], *, frame_num: int = 8, frame_method: str = "spaced_fixed",
                 spatial_size: int = 224, normalize: bool = False, data_aug: bool = False,
                 crop: Optional[str] = None, seed: int = 0, cache_mb: float = 0.0,
                 check_frames: bool = True, allow_missing: bool = False, name: str = "clips"):
        if frame_method not in FRAME_METHODS:
            raise DivingDataError(f"frame_method={frame_method!r} is unknown; choose one of "
                                  f"{', '.join(FRAME_METHODS)}")
        if int(frame_num) < 1 or int(spatial_size) < 1:
            raise DivingDataError(f"frame_num={frame_num}, spatial_size={spatial_size}: both must be >= 1")
        crop = crop or ("random" if data_aug else "none")
        if crop not in CROP_MODES:
            raise DivingDataError(f"crop={crop!r} is unknown; choose one of {', '.join(CROP_MODES)}")
        self.frames_dir = Path(frames_dir)
        self.frame_num, self.frame_method = int(frame_num), frame_method
        self.spatial_size, self.normalize, self.crop = int(spatial_size), bool(normalize), crop
        self.flip = bool(data_aug)
        self.seed, self.epoch, self.name = int(seed), 0, name
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: "OrderedDict[Tuple[int, int], np.ndarray]" = OrderedDict()
        self._cached = 0
        self._src_shape: Dict[int, Tuple[int, int]] = {}
        self.dropped: List[Key] = []
        clips = []
        for key in keys:
            a = annotations.get(key)
            if a is None:
                raise DivingDataError(f"{name}: clip {key} has no annotation; load splits with "
                                      "load_split(path, annotations) to check them first")
            clips.append((key, int(a["start_frame"]), int(a["end_frame"]), float(a["difficulty"]),
                          float(a["final_score"])))
        if check_frames:
            clips = self._check_frames(clips, allow_missing)
        self.clips = clips
        mean = np.array(MEAN if normalize else (0.0, 0.0, 0.0), dtype=np.float64)
        std = np.array(STD if normalize else (1.0, 1.0, 1.0), dtype=np.float64)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._bias = (-mean / std).astype(np.float32)

    # -- construction ---------------------------------------------------------------------------
    def _check_frames(self, clips: List[tuple], allow_missing: bool) -> List[tuple]:
        present: Dict[int, set] = {}
        bad: List[Tuple[Key, int, int, str]] = []
        for clip in clips:
            (video, _), start, end = clip[0], clip[1], clip[2]
            if video not in present:
                d = self.frames_dir / f"{video:02d}"
                present[video] = set(os.listdir(d)) if d.is_dir() else set()
            names = present[video]
            missing = [f for f in range(start, end + 1) if f"{f:06d}.jpg" not in names]
            if missing:
                bad.append((clip[0], len(missing), end - start + 1, f"{video:02d}/{missing[0]:06d}.jpg"))
        if not bad:
            return clips
        if allow_missing:
            gone = {b[0] for b in bad}
            self.dropped = sorted(gone)
            warnings.warn(f"{self.name}: left out {len(gone)} clip(s) whose frames are missing under "
                          f"{self.frames_dir} (allow_missing): {', '.join(map(str, self.dropped[:5]))}"
                          f"{' ...' if len(gone) > 5 else ''}", stacklevel=3)
            return [c for c in clips if c[0] not in gone]
        shown = "; ".join(f"clip {k}: {m} of {n} frames missing (first: {first})" for k, m, n, first in bad[:5])
        more = f" (and {len(bad) - 5} more clips)" if len(bad) > 5 else ""
        raise FramesMissingError(
            f"{self.name}: frames missing under {self.frames_dir}: {shown}{more}. Run the prepare stage "
            "(frame extraction) for these videos first, or leave them out with "
            "--set data.allow_missing=true.")

    # -- Dataset API ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's frames and crops (deterministic in (seed, epoch, index))."""
        self.epoch = int(epoch)

    def keys(self) -> List[Key]:
        return [c[0] for c in self.clips]

    def final_scores(self) -> np.ndarray:
        return np.array([c[4] for c in self.clips], dtype=np.float64)

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            index, epoch = int(item[0]), int(item[1])
        else:
            index, epoch = int(item), self.epoch
        key, start, end, difficulty, final_score = self.clips[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        numbers = sample_frame_numbers(start, end, self.frame_num, self.frame_method, rng)
        S = self.spatial_size
        need = intermediate_size(S) if self.crop != "none" else (S, S)
        box = None  # crop window, as fractions of the intermediate (resized) frame
        if self.crop != "none":
            h, w = need
            if self.crop == "random":
                y0, x0 = int(rng.integers(0, h - S + 1)), int(rng.integers(0, w - S + 1))
            else:
                y0, x0 = (h - S) // 2, (w - S) // 2
            box = (y0 / h, x0 / w, (y0 + S) / h, (x0 + S) / w)
        frames = np.stack([self._resized(self._decoded(key[0], f, need), box, S) for f in numbers])
        if self.flip and rng.random() < 0.5:
            frames = frames[:, :, ::-1]
        # uint8 [T, H, W, BGR] -> float32 [RGB, T, H, W] in one pass per channel (x * scale + bias:
        # /255, and the seed's normalisation when asked); much faster than torch on a permuted view
        clip = np.empty((3,) + frames.shape[:3], dtype=np.float32)
        for c in range(3):
            np.multiply(frames[..., 2 - c], self._scale[c], out=clip[c], casting="unsafe")
            if self._bias[c]:
                clip[c] += self._bias[c]
        clip = torch.from_numpy(clip)
        target = torch.tensor([final_score / difficulty / 30.0, difficulty], dtype=torch.float32)
        return clip, target, final_score, key

    # -- frame reading --------------------------------------------------------------------------
    @staticmethod
    def _resized(img: np.ndarray, box: Optional[Tuple[float, float, float, float]], S: int) -> np.ndarray:
        """Crop ``box`` (fractions; None = whole frame) and resize to S x S in one step: the same
        pixels as resizing to the intermediate size and cropping there, at a fraction of the cost."""
        if box is not None:
            h, w = img.shape[:2]
            y0, x0 = int(round(box[0] * h)), int(round(box[1] * w))
            y1, x1 = max(y0 + 1, int(round(box[2] * h))), max(x0 + 1, int(round(box[3] * w)))
            img = img[y0:y1, x0:x1]
        if img.shape[0] == S and img.shape[1] == S:
            return img
        shrink = img.shape[0] > S or img.shape[1] > S
        return cv2.resize(img, (S, S), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def _decoded(self, video: int, number: int, need: Tuple[int, int]) -> np.ndarray:
        """The frame as decoded (BGR), at 1/2, 1/4 or 1/8 scale when that still covers ``need``."""
        ck = (video, number)
        if self.cache_bytes:
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                return hit
        path = self.frames_dir / f"{video:02d}" / f"{number:06d}.jpg"
        flag = cv2.IMREAD_COLOR
        src = self._src_shape.get(video)
        if src is not None:
            for factor, reduced in _REDUCED:
                if src[0] // factor >= need[0] and src[1] // factor >= need[1]:
                    flag = reduced
                    break
        img = cv2.imread(str(path), flag)
        if img is None:
            raise FramesMissingError(
                f"{self.name}: cannot read {path} (missing or corrupt JPEG). Delete "
                f"{path.parent} and run the prepare stage again to re-extract video {video:02d}.")
        if src is None:
            self._src_shape[video] = img.shape[:2]
        if self.cache_bytes:
            self._cache[ck] = img
            self._cached += img.nbytes
            while self._cached > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return img


class DivingSplits(NamedTuple):
    train: DivingClips
    val: DivingClips
    test: DivingClips


def split_train_val(keys: Sequence[Key], ratio: float, seed: int = 0) -> Tuple[List[Key], List[Key]]:
    """The seed's train/validation split of the train split: ``int(n * ratio)`` clips for training,
    chosen by a permutation that depends only on ``seed``."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise DivingDataError(f"train_val_split_ratio={ratio}: must lie in [0, 1]")
    keys = list(keys)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_train = int(len(keys) * ratio)
    return [keys[i] for i in order[:n_train]], [keys[i] for i in order[n_train:]]


def build_datasets(root: Optional[os.PathLike] = None, *, annotation_path: Optional[os.PathLike] = None,
                   train_path: Optional[os.PathLike] = None, test_path: Optional[os.PathLike] = None,
                   frames_dir: Optional[os.PathLike] = None, videos: Any = "all",
                   train_val_split_ratio: float = 0.8, split_seed: int = 0, frame_num: int = 8,
                   frame_method: str = "spaced_fixed", spatial_size: int = 224, normalize: bool = False,
                   data_aug: bool = False, seed: int = 0, cache_mb: float = 0.0,
                   allow_missing: bool = False, annotations: Optional[Annotations] = None) -> DivingSplits:
    """Train / validation / test datasets, with the seed's argument names.

    Paths default to the data root's files (``final_annotations_dict.pkl``, ``train_split_0.pkl``,
    ``test_split_0.pkl``, ``whole_videos_frames/``); the seed's ``root_dir`` is ``frames_dir``.
    Every split clip must be annotated and have its frames on disk (else a clear error), unless
    ``allow_missing``, which leaves out clips whose frames are missing.
    """
    if root is None and None in (annotation_path, train_path, test_path, frames_dir):
        raise DivingDataError("build_datasets: give the data root, or all of annotation_path, "
                              "train_path, test_path and frames_dir")
    r = Path(root) if root is not None else None
    annotation_path = Path(annotation_path) if annotation_path else r / "final_annotations_dict.pkl"
    train_path = Path(train_path) if train_path else r / "train_split_0.pkl"
    test_path = Path(test_path) if test_path else r / "test_split_0.pkl"
    frames_dir = Path(frames_dir) if frames_dir else r / "whole_videos_frames"
    if annotations is None:
        annotations = load_annotations(annotation_path)
    train_keys = load_split(train_path, annotations, str(annotation_path))
    test_keys = load_split(test_path, annotations, str(annotation_path))
    check_disjoint(train_keys, test_keys, str(train_path), str(test_path))
    wanted = parse_videos(videos)
    check_videos_annotated(wanted, annotations, str(annotation_path))
    if wanted is not None:
        train_keys = [k for k in train_keys if k[0] in wanted]
        test_keys = [k for k in test_keys if k[0] in wanted]
    if not train_keys or not test_keys:
        raise DivingDataError(f"videos={videos!r} leaves {len(train_keys)} train and {len(test_keys)} "
                              "test clips; choose videos that appear in both splits (or 'all')")
    tr, va = split_train_val(train_keys, train_val_split_ratio, split_seed)
    common = dict(frame_num=frame_num, frame_method=frame_method, spatial_size=spatial_size,
                  normalize=normalize, seed=seed, cache_mb=cache_mb, allow_missing=allow_missing)
    eval_crop = "center" if data_aug else "none"
    return DivingSplits(
        DivingClips(frames_dir, annotations, tr, data_aug=data_aug, name="train", **common),
        DivingClips(frames_dir, annotations, va, crop=eval_crop, name="val", **common),
        DivingClips(frames_dir, annotations, test_keys, crop=eval_crop, name="test", **common),
    )
