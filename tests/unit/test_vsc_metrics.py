"""data/vsc/metrics and localization: the matching track's segment AP and the pair micro AP on cases
worked out by hand (partial overlaps on both time axes, duplicates, distractor queries, ties), and
the temporal localisation of a copied diagonal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.retrieval.micro_ap import micro_average_precision
from data.vsc.localization import localize
from data.vsc.matches import Match, read_matches, write_matches
from data.vsc.metrics import evaluate, intersection_length, pair_micro_ap, segment_ap, union_length


def m(q, r, qs, qe, rs, re, score=1.0):
    return Match(q, r, qs, qe, rs, re, score)


GT = [m("Q1", "R1", 0, 10, 0, 10)]


def test_interval_lengths():
    assert union_length([(2, 5), (7, 8), (4, 6)]) == 5  # [2, 6] + [7, 8]
    assert intersection_length([(2, 5), (7, 8)], [(1, 3), (4, 7)]) == 2  # [2, 3] + [4, 5]


def test_exact_prediction_scores_one():
    assert segment_ap(GT, [m("Q1", "R1", 0, 10, 0, 10, 0.3)]) == pytest.approx(1.0)


def test_partial_overlap_on_both_axes():
    # query axis: I = 5 (5..10), T = 10, G = 10; reference axis: I = 8 (2..10), T = 10, G = 10
    # P = sqrt(0.5 * 0.8) = R  ->  AP = 0.4
    assert segment_ap(GT, [m("Q1", "R1", 5, 15, 2, 12)]) == pytest.approx(0.4)
    # half the reference span only: P = 1, R = sqrt(1 * 0.5)
    assert segment_ap(GT, [m("Q1", "R1", 0, 10, 0, 5)]) == pytest.approx(math.sqrt(0.5))


def test_a_box_that_misses_the_truth_on_one_axis_finds_nothing():
    # the query spans coincide, but the boxes share no area: the ground truth is not "touched"
    assert segment_ap(GT, [m("Q1", "R1", 0, 10, 20, 30)]) == 0.0


def test_a_distractor_query_ranked_first_halves_precision():
    false = m("Q9", "R1", 0, 10, 0, 10, 0.9)  # a query with no copy at all
    true = m("Q1", "R1", 0, 10, 0, 10, 0.5)
    # group 0.9: I = 0, T = 10 -> R = 0; group 0.5: I = 10, T = 20 -> P = 0.5, R = 1
    assert segment_ap(GT, [false, true]) == pytest.approx(0.5)
    assert segment_ap(GT, [true._replace(score=0.9), false._replace(score=0.5)]) == pytest.approx(1.0)


def test_duplicate_and_overlapping_predictions_count_their_union_once():
    a, b = m("Q1", "R1", 0, 6, 0, 6, 0.9), m("Q1", "R1", 4, 10, 4, 10, 0.8)
    # after a: P = 1, R = 0.6; after b: union 0..10 -> P = 1, R = 1: AP = 0.6 + 0.4
    assert segment_ap(GT, [a, b]) == pytest.approx(1.0)
    exact = m("Q1", "R1", 0, 10, 0, 10, 0.9)
    assert segment_ap(GT, [exact, exact._replace(score=0.8)]) == pytest.approx(1.0)


def test_equal_scores_form_one_group():
    true, false = m("Q1", "R1", 0, 10, 0, 10, 0.5), m("Q2", "R5", 0, 10, 0, 10, 0.5)
    # one cut-off: I = 10, T = 20 on both axes -> P = 0.5, R = 1, in either order
    assert segment_ap(GT, [true, false]) == pytest.approx(0.5)
    assert segment_ap(GT, [false, true]) == pytest.approx(0.5)


def test_recall_is_over_all_ground_truth_length():
    gt = GT + [m("Q2", "R2", 0, 30, 0, 30)]
    assert segment_ap(gt, [m("Q1", "R1", 0, 10, 0, 10)]) == pytest.approx(0.25)  # 10 of 40 s on each axis
    # a second ground-truth segment of the same pair: G is the union per pair (0..10 and 20..25)
    gt = GT + [m("Q1", "R1", 20, 25, 20, 25)]
    assert segment_ap(gt, [m("Q1", "R1", 0, 10, 0, 10)]) == pytest.approx(10 / 15)


def test_pair_micro_ap_by_hand():
    gt = [m("Q1", "R1", 0, 1, 0, 1), m("Q3", "R3", 0, 1, 0, 1), m("Q4", "R4", 0, 1, 0, 1),
          m("Q1", "R1", 5, 6, 5, 6)]  # a pair with two segments is one pair
    preds = [m("Q1", "R1", 0, 1, 0, 1, 0.2), m("Q1", "R1", 5, 6, 5, 6, 0.9),  # pair score: the best, 0.9
             m("Q2", "R5", 0, 1, 0, 1, 0.8), m("Q3", "R3", 0, 1, 0, 1, 0.7)]
    # ranked: Q1R1 (P 1, R 1/3), Q2R5 (false), Q3R3 (P 2/3, R 2/3): 1/3 + 2/9
    assert pair_micro_ap(gt, preds) == pytest.approx(5 / 9)
    result = evaluate(gt, preds)
    assert result["ground_truth_pairs"] == 3 and result["pairs_found"] == 2 and result["predictions"] == 4


def test_micro_ap_ties_grouped_or_worst_case():
    scores, truth = [0.5, 0.5, 0.5], [False, True, True]
    # grouped (VSC): one cut-off at P = 2/3, R = 1; worst case (ISC): false first: 1/2 * 1/2 + 2/3 * 1/2
    assert micro_average_precision(scores, truth, 2, ties="grouped") == pytest.approx(2 / 3)
    assert micro_average_precision(scores, truth, 2, ties="worst") == pytest.approx(0.25 + 1 / 3)
    assert micro_average_precision([], [], 2) == 0.0
    with pytest.raises(ValueError, match="ties"):
        micro_average_precision(scores, truth, 2, ties="best")


def test_localize_finds_the_copied_diagonal():
    t = np.arange(10, dtype=float)
    sim = np.full((10, 10), 0.1)
    for k in range(4):  # query frames 3..6 copy reference frames 1..4
        sim[3 + k, 1 + k] = 0.9
    sim[8, 8] = 0.95  # a lone strong frame on another diagonal loses the vote
    (seg,) = localize(sim, t, t, 1.0, 1.0, threshold=0.5)
    assert (seg.query_start, seg.query_end, seg.ref_start, seg.ref_end) == (3, 7, 1, 5)
    assert seg.score == pytest.approx(0.9)
    sim[5, 3] = 0.1  # one frame missing inside the copy: bridged with max_gap=1, split with 0
    assert len(localize(sim, t, t, 1.0, 1.0, threshold=0.5, max_gap=1)) == 1
    assert len(localize(sim, t, t, 1.0, 1.0, threshold=0.5, max_gap=0)) == 2
    assert localize(np.full((10, 10), 0.1), t, t, 1.0, 1.0, threshold=0.5) == []


def test_matches_csv_round_trip(tmp_path):
    rows = [m("Q100001", "R100002", 1.5, 4.5, 2.25, 5.25, 0.75)]
    write_matches(tmp_path / "m.csv", rows)
    assert read_matches(tmp_path / "m.csv") == rows
    write_matches(tmp_path / "gt.csv", rows, with_score=False)
    assert read_matches(tmp_path / "gt.csv", ground_truth=True)[0].score == 1.0
    with pytest.raises(ValueError, match="score"):
        read_matches(tmp_path / "gt.csv")
