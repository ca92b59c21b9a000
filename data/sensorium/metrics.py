"""The Sensorium 2023 metric: per-neuron Pearson correlation over time.

For each mouse, each trial is cut to frames ``[skip_first, last_frame)`` (the competition: 50 to
300, ``submission_skip_first`` = 50), the trials are concatenated in time, and every neuron's
prediction is correlated with its responses. The score is the mean over neurons, then over mice.
A neuron whose prediction or responses are constant has correlation 0.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np


def window(array: np.ndarray, skip_first: int, last_frame: int) -> np.ndarray:
    """Frames [skip_first, last_frame) of a (neurons, T) array (T may be shorter than last_frame)."""
    return np.asarray(array)[:, skip_first:last_frame]


def neuron_correlations(predictions: Sequence[np.ndarray], responses: Sequence[np.ndarray],
                        skip_first: int = 50, last_frame: int = 300) -> np.ndarray:
    """Per-neuron Pearson r over the concatenated windows of the trials: (neurons,)."""
    if len(predictions) != len(responses) or not predictions:
        raise ValueError(f"{len(predictions)} predicted trials for {len(responses)} response trials: "
                         "give the same non-empty list of trials")
    pred = np.concatenate([window(p, skip_first, last_frame) for p in predictions], axis=1).astype(np.float64)
    true = np.concatenate([window(r, skip_first, last_frame) for r in responses], axis=1).astype(np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"predictions {pred.shape} and responses {true.shape} differ after windowing")
    if pred.shape[1] < 2:
        raise ValueError(f"{pred.shape[1]} frames left after skipping the first {skip_first}: need at least 2")
    pc = pred - pred.mean(axis=1, keepdims=True)
    tc = true - true.mean(axis=1, keepdims=True)
    denom = np.sqrt((pc ** 2).sum(axis=1) * (tc ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, (pc * tc).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    return corr


def mouse_correlation(predictions, responses, skip_first: int = 50, last_frame: int = 300) -> float:
    return float(neuron_correlations(predictions, responses, skip_first, last_frame).mean())


def correlation(per_mouse: Mapping[str, tuple], skip_first: int = 50, last_frame: int = 300) -> Dict[str, object]:
    """``{mouse: (predictions, responses)}`` -> ``{"correlation": mean over mice, "mice": {mouse: r}}``."""
    mice = {m: mouse_correlation(p, r, skip_first, last_frame) for m, (p, r) in per_mouse.items()}
    return {"correlation": float(np.mean(list(mice.values()))) if mice else float("nan"), "mice": mice}
