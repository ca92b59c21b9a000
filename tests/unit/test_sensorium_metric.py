"""The Sensorium correlation metric against hand-made cases and numpy/scipy: per neuron over the
concatenated frame windows of the trials, mean over neurons, then over mice."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr

from data.sensorium.metrics import correlation, mouse_correlation, neuron_correlations


def test_a_perfect_and_an_anti_correlated_neuron():
    t = np.arange(10, dtype=float)
    pred = np.stack([t, t])
    true = np.stack([2 * t + 1, -t])
    r = neuron_correlations([pred], [true], skip_first=0, last_frame=10)
    np.testing.assert_allclose(r, [1.0, -1.0])
    assert mouse_correlation([pred], [true], 0, 10) == pytest.approx(0.0)


def test_hand_computed_value():
    # x = [1, 2, 3], y = [1, 3, 2]: cov = 0.5 * 2 / 2 ... r = 0.5 exactly
    r = neuron_correlations([np.array([[1.0, 2.0, 3.0]])], [np.array([[1.0, 3.0, 2.0]])], 0, 3)
    assert r[0] == pytest.approx(0.5)


def test_the_window_skips_the_first_frames_of_every_trial_and_stops_at_last_frame():
    rng = np.random.default_rng(0)
    trials = [(rng.normal(size=(3, 12)), rng.normal(size=(3, 12))) for _ in range(2)]
    # garbage in the skipped frames and after last_frame must not matter
    spoiled = [(p.copy(), r.copy()) for p, r in trials]
    for p, r in spoiled:
        p[:, :4] = 1e6
        r[:, 10:] = -1e6
    got = neuron_correlations([p for p, _ in spoiled], [r for _, r in spoiled], skip_first=4, last_frame=10)
    x = np.concatenate([p[:, 4:10] for p, _ in trials], axis=1)
    y = np.concatenate([r[:, 4:10] for _, r in trials], axis=1)
    want = [pearsonr(x[n], y[n]).statistic for n in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_trials_shorter_than_last_frame_are_used_whole():
    p = [np.array([[0.0, 1.0, 2.0, 3.0]]), np.array([[5.0, 1.0, 0.0]])]
    r = [np.array([[0.0, 2.0, 1.0, 3.0]]), np.array([[4.0, 0.0, 1.0]])]
    got = neuron_correlations(p, r, skip_first=1, last_frame=300)
    want = pearsonr([1, 2, 3, 1, 0], [2, 1, 3, 0, 1]).statistic
    assert got[0] == pytest.approx(want)


def test_a_constant_neuron_scores_zero_not_nan():
    pred = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    true = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(neuron_correlations([pred], [true], 0, 4), [0.0, 0.0])


def test_mean_over_neurons_then_over_mice():
    t = np.arange(6, dtype=float)
    a = ([np.stack([t, t, t])], [np.stack([t, -t, t])])  # neurons 1, -1, 1 -> 1/3
    b = ([np.stack([t])], [np.stack([t ** 2])])          # one neuron
    rb = pearsonr(t, t ** 2).statistic
    out = correlation({"a": a, "b": b}, skip_first=0, last_frame=6)
    assert out["mice"]["a"] == pytest.approx(1 / 3)
    assert out["mice"]["b"] == pytest.approx(rb)
    assert out["correlation"] == pytest.approx((1 / 3 + rb) / 2)  # not the mean over all 4 neurons


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="same non-empty list"):
        neuron_correlations([np.zeros((1, 5))], [], 0, 5)
    with pytest.raises(ValueError, match="at least 2"):
        neuron_correlations([np.zeros((1, 5))], [np.zeros((1, 5))], 4, 5)
