"""The descriptor track's metrics against cases worked out by hand (ties, distractors, misses)."""

from __future__ import annotations

import math

import pytest

from data.isc.metrics import evaluate, read_predictions

GT = [("Q00001", "R000001"), ("Q00002", "R000002"), ("Q00003", None)]  # Q00003: a distractor


def test_ranked_list_by_hand():
    # ranked: T, F (the distractor's best guess), T, F
    # precision 1, 1/2, 2/3, 2/4; recall 1/2, 1/2, 1, 1
    # AP = 1/2 * 1 + 0 + 1/2 * 2/3 + 0 = 5/6; P >= 0.9 only at the first cut-off: recall 1/2
    preds = [("Q00002", "R000003", 0.6), ("Q00001", "R000001", 0.9), ("Q00003", "R000005", 0.8),
             ("Q00002", "R000002", 0.7)]
    m = evaluate(preds, GT)
    assert m["uap"] == pytest.approx(5 / 6)
    assert m["recall_p90"] == pytest.approx(0.5)
    assert m["threshold_p90"] == pytest.approx(0.9)
    assert m["positives"] == 2 and m["predictions"] == 4 and m["true_predictions"] == 2 and m["queries"] == 3
    assert m["recall_rank1"] == pytest.approx(1.0)  # each true pair is its query's best guess


def test_ties_count_worst_case():
    # Q00001's true pair and the distractor's guess share a score: the false one ranks first,
    # so precision at the true pair is 1/2 and AP = 1/2 (x recall 1/2) + 1/2 x 2/3 for Q00002's pair
    preds = [("Q00001", "R000001", 0.5), ("Q00003", "R000009", 0.5), ("Q00002", "R000002", 0.4)]
    m = evaluate(preds, GT)
    assert m["uap"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert m["recall_p90"] is None  # no cut-off reaches precision 0.9

    # one score for everything cannot buy a good AP: all three tie, the true ones rank last
    flat = [(q, r, 1.0) for q, r, _ in preds]
    assert evaluate(flat, GT)["uap"] == pytest.approx(0.5 * 1 / 2 + 0.5 * 2 / 3)
    # order of the input does not matter
    assert evaluate(list(reversed(flat)), GT)["uap"] == pytest.approx(evaluate(flat, GT)["uap"])


def test_a_true_pair_never_predicted_lowers_recall():
    # only Q00001's pair is found (first): recall stops at 1/2, AP = 1/2
    preds = [("Q00001", "R000001", 0.9), ("Q00002", "R000007", 0.8)]
    m = evaluate(preds, GT)
    assert m["uap"] == pytest.approx(0.5)
    assert m["recall_p90"] == pytest.approx(0.5)
    assert m["recall_rank10"] == pytest.approx(0.5)  # Q00002's true pair is in no list


def test_distractor_predictions_only_hurt():
    perfect = [("Q00001", "R000001", 0.9), ("Q00002", "R000002", 0.8)]
    assert evaluate(perfect, GT)["uap"] == pytest.approx(1.0)
    assert evaluate(perfect, GT)["recall_p90"] == pytest.approx(1.0)
    # a confident guess for the distractor above both true pairs: precision 1/2, 2/3
    worse = perfect + [("Q00003", "R000004", 0.95)]
    assert evaluate(worse, GT)["uap"] == pytest.approx(0.5 * 1 / 2 + 0.5 * 2 / 3)
    # below them it costs nothing
    assert evaluate(perfect + [("Q00003", "R000004", 0.1)], GT)["uap"] == pytest.approx(1.0)


def test_rank_metrics_count_ties_worst_case():
    preds = [("Q00001", "R000009", 0.7), ("Q00001", "R000001", 0.7), ("Q00002", "R000002", 0.9)]
    m = evaluate(preds, GT)
    assert m["recall_rank1"] == pytest.approx(0.5)  # Q00001's pair ties with a wrong one: rank 1
    assert m["recall_rank10"] == pytest.approx(1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="more than once"):
        evaluate([("Q00001", "R000001", 0.9), ("Q00001", "R000001", 0.8)], GT)
    with pytest.raises(ValueError, match="NaN"):
        evaluate([("Q00001", "R000001", math.nan)], GT)
    with pytest.raises(ValueError, match="no query with a reference"):
        evaluate([("Q00001", "R000001", 0.9)], [("Q00001", None)])
    assert evaluate([], GT)["uap"] == 0.0


def test_predictions_csv_round_trip(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("query_id,reference_id,score\nQ00001,R000001,-0.25\nQ00002,R000003,-1.5\n")
    assert read_predictions(path) == [("Q00001", "R000001", -0.25), ("Q00002", "R000003", -1.5)]
    (tmp_path / "bad.csv").write_text("q,r,s\n")
    with pytest.raises(ValueError, match="header"):
        read_predictions(tmp_path / "bad.csv")
