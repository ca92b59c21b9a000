"""mAP@1000 of the product workflow against cases computed by hand, and the partial sort."""

from __future__ import annotations

import numpy as np
import pytest

from data.product.metrics import average_precision, map_at_k, retrieval_map, top_k


def test_average_precision_by_hand():
    # relevant at ranks 1 and 3 of 2 positives: (1/1 + 2/3) / 2
    assert average_precision([True, False, True, False], 2) == pytest.approx((1 + 2 / 3) / 2)
    # relevant at ranks 2 and 4: (1/2 + 2/4) / 2
    assert average_precision([False, True, False, True], 2) == pytest.approx(0.5)
    # one of three positives found, at rank 1: the two never retrieved still count
    assert average_precision([True, False], 3) == pytest.approx(1 / 3)
    assert average_precision([False, False, False], 1) == 0.0
    with pytest.raises(ValueError, match="no gallery image"):
        average_precision([True], 0)


def test_map_over_queries_by_hand():
    gallery = ["A", "B", "A", "C"]
    ranked = np.array([[0, 1, 2, 3],    # query A: ranks 1, 3 -> 0.8333
                       [3, 1, 0, 2],    # query B: rank 2 of 1 positive -> 0.5
                       [1, 0, 2, 3]])   # query C: rank 4 -> 0.25
    expected = ((1 + 2 / 3) / 2 + 0.5 + 0.25) / 3
    assert map_at_k(ranked, ["A", "B", "C"], gallery) == pytest.approx(expected)
    # cut to k=2: query A keeps rank 1 only (still / 2 positives), B keeps rank 2, C finds nothing
    assert map_at_k(ranked[:, :2], ["A", "B", "C"], gallery) == pytest.approx((0.5 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match="repeats"):
        map_at_k(np.array([[0, 0]]), ["A"], gallery)
    with pytest.raises(ValueError, match="no image in the gallery"):
        map_at_k(np.array([[0, 1]]), ["Z"], gallery)


def test_retrieval_map_uses_min_of_1000_and_the_gallery_size():
    # 2-d embeddings; query 0 is closest to gallery 0 (its product), then 2 (also its product)
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])
    queries = np.array([[1.0, 0.1], [0.1, 1.0]])
    out = retrieval_map(queries, gallery, [7, 8], [7, 8, 7, 9, 9])
    assert out["k"] == 5 and out["acc1"] == 1.0
    # query 7: ranks 1, 2 of 2 -> 1.0; query 8: gallery 1 first -> 1.0
    assert out["map"] == pytest.approx(1.0)
    out = retrieval_map(queries, gallery, [9, 8], [7, 8, 7, 9, 9])
    # query 9 (at [1, .1]): order 0 (.995), 2 (.85), 1 (.1), 4 (-.1), 3 (-.995): ranks 4 and 5 -> (1/4 + 2/5) / 2
    assert out["map"] == pytest.approx(((1 / 4 + 2 / 5) / 2 + 1.0) / 2)
    assert out["acc1"] == 0.5


def test_partial_sort_matches_a_full_sort():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(20, 300)).astype(np.float32)
    full = np.argsort(-sims, axis=1, kind="stable")
    for k in (1, 7, 300, 1000):
        got = top_k(sims, k)
        assert got.shape == (20, min(k, 300))
        assert (got == full[:, :min(k, 300)]).all(), k
