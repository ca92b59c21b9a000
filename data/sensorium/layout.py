"""The Sensorium 2023 per-mouse layout and the seed's fold split.

    <root>/<mouse>/meta/trials/tiers.npy          (trials,) str: train | oracle | live_test_main | ...
    <root>/<mouse>/meta/neurons/unit_ids.npy      (neurons,)
    <root>/<mouse>/data/videos/{trial}.npy        (H, W, T)
    <root>/<mouse>/data/behavior/{trial}.npy      (2, T)  pupil dilation, running speed
    <root>/<mouse>/data/pupil_center/{trial}.npy  (2, T)
    <root>/<mouse>/data/responses/{trial}.npy     (neurons, T)

Trials are NaN-padded to a common T: a trial's length is the index of the first NaN of its
behaviour. The labeled trials (``train`` and ``oracle``) are split into folds as the seed does:
shuffled with ``numpy.random.default_rng(12)`` and cut into ``num_folds`` nearly equal parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

LABELED_TIERS = ("train", "oracle")
UNLABELED_SPLITS = ("live_test_main", "live_test_bonus", "final_test_main", "final_test_bonus")
FOLD_SEED = 12  # the seed's generator for the fold split
FIELDS = ("videos", "behavior", "pupil_center", "responses")


class LayoutError(ValueError):
    """A data root that is not in the Sensorium layout."""


def fold_split(num_folds: int, fold: int) -> str:
    return f"fold_{fold}"


def fold_tiers(tiers: np.ndarray, num_folds: int, seed: int = FOLD_SEED) -> np.ndarray:
    """``tiers`` with each labeled trial renamed ``fold_K``: the seed's split."""
    if num_folds < 2:
        raise ValueError(f"num_folds={num_folds}: need at least 2 folds (one validates, the rest train)")
    out = np.asarray(tiers).astype(object).copy()
    ids = np.flatnonzero(np.isin(out.astype(str), LABELED_TIERS))
    if len(ids) < num_folds:
        raise LayoutError(f"only {len(ids)} labeled trials for {num_folds} folds: every fold needs one")
    np.random.default_rng(seed=seed).shuffle(ids)
    for fold, fold_ids in enumerate(np.array_split(ids, num_folds)):
        out[fold_ids] = f"fold_{fold}"
    return out.astype(str)


def trial_length(behavior: np.ndarray) -> int:
    """Frames before the NaN padding (the index of the first NaN of the first behaviour row)."""
    nan = np.flatnonzero(np.isnan(np.asarray(behavior)[0]))
    return int(nan[0]) if len(nan) else int(np.asarray(behavior).shape[-1])


@dataclass
class Mouse:
    name: str
    root: Path
    tiers: np.ndarray       # with fold_K for the labeled trials
    unit_ids: np.ndarray

    @property
    def num_neurons(self) -> int:
        return int(len(self.unit_ids))

    def trials(self, split: str) -> List[int]:
        """Trial ids of a split: ``fold_K``, ``train``-side folds via :meth:`train_trials`, or an unlabeled split."""
        return [int(t) for t in np.flatnonzero(self.tiers == split)]

    def labeled_trials(self) -> List[int]:
        return [int(t) for t in np.flatnonzero(np.char.startswith(self.tiers.astype(str), "fold_"))]

    def train_trials(self, val_fold: int) -> List[int]:
        val = f"fold_{val_fold}"
        return [t for t in self.labeled_trials() if self.tiers[t] != val]

    def path(self, field: str, trial: int) -> Path:
        return self.root / self.name / "data" / field / f"{trial}.npy"

    def load(self, field: str, trial: int) -> np.ndarray:
        return np.load(self.path(field, trial))

    def has_responses(self, trial: int) -> bool:
        path = self.path("responses", trial)
        if not path.exists():
            return False
        return bool(np.isfinite(np.load(path, mmap_mode="r")[:, :1]).all())


def list_mice(root: Path) -> List[str]:
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / "meta" / "trials" / "tiers.npy").is_file()) \
        if root.is_dir() else []


def check_mouse(root: Path, name: str) -> Dict[str, int]:
    """Every trial of the tiers file has its four arrays with matching shapes (responses: labeled
    trials only); raises :class:`LayoutError` naming the first problem. Returns counts."""
    base = Path(root) / name
    for rel in ("meta/trials/tiers.npy", "meta/neurons/unit_ids.npy"):
        if not (base / rel).is_file():
            raise LayoutError(f"{base / rel} is missing: {base} is not a Sensorium mouse directory")
    tiers = np.load(base / "meta" / "trials" / "tiers.npy").astype(str)
    neurons = len(np.load(base / "meta" / "neurons" / "unit_ids.npy"))
    for trial, tier in enumerate(tiers):
        fields = FIELDS if tier in LABELED_TIERS else FIELDS[:3]
        shapes = {}
        for field in fields:
            path = base / "data" / field / f"{trial}.npy"
            if not path.is_file():
                raise LayoutError(f"{path} is missing (trial {trial}, tier {tier})")
            shapes[field] = np.load(path, mmap_mode="r").shape
        frames = {shapes["videos"][-1], shapes["behavior"][-1], shapes["pupil_center"][-1]}
        if "responses" in shapes:
            frames.add(shapes["responses"][-1])
            if shapes["responses"][0] != neurons:
                raise LayoutError(f"{base}/data/responses/{trial}.npy has {shapes['responses'][0]} neurons, "
                                  f"unit_ids.npy lists {neurons}")
        if len(frames) != 1:
            raise LayoutError(f"trial {trial} of {name}: arrays disagree on the frame count ({shapes})")
    return {"trials": int(len(tiers)), "neurons": int(neurons)}


def load_mice(root: Path, num_folds: int, names: Optional[Sequence[str]] = None) -> List[Mouse]:
    root = Path(root)
    names = list(names) if names else list_mice(root)
    if not names:
        raise LayoutError(f"no mouse directories (with meta/trials/tiers.npy) under {root}")
    mice = []
    for name in names:
        base = root / name
        tiers = np.load(base / "meta" / "trials" / "tiers.npy").astype(str)
        mice.append(Mouse(name, root, fold_tiers(tiers, num_folds), np.load(base / "meta" / "neurons" / "unit_ids.npy")))
    return mice
