"""data/isc: the synthetic set's DISC21 layout, the layout checks, the datasets, the edits, and
the post-process (DBA, NES, kNN) on a toy case worked out by hand."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from data.isc import augment, datasets, postprocess, synthetic
from data.retrieval import dba, knn, nes
from data.isc.layout import Disc21, LayoutError, list_images, positive_pairs, read_ground_truth


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("isc") / "micro"
    summary = synthetic.generate(root, preset="micro")
    return root, summary


def _gt(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_synthetic_set_has_the_disc21_layout(micro):
    root, summary = micro
    p = synthetic.PRESETS["micro"]
    for folder, kind, n in (("reference_images", "reference", p["references"]),
                            ("training_images", "training", p["training"]),
                            ("query_images", "query", p["queries"]),
                            ("query_images_phase2", "query", p["phase2_queries"])):
        ids, paths = list_images(root / folder, kind)
        assert len(ids) == n, folder
    assert (root / "reference_images" / "R000000.jpg").exists()
    assert (root / "training_images" / "T000000.jpg").exists()
    assert (root / "query_images" / "Q00000.jpg").exists()
    # phase-2 ids continue after phase 1's, as DISC21's
    assert list_images(root / "query_images_phase2", "query")[0][0] == f"Q{p['queries']:05d}"
    rows = _gt(root / "public_ground_truth.csv")
    assert rows[0] == ["query_id", "reference_id"]
    assert len(rows) - 1 == p["queries"]
    empty = [r for r in rows[1:] if r[1] == ""]
    assert len(empty) == p["queries"] - p["query_positives"]  # distractors: no reference
    gt = read_ground_truth(root / "phase2_ground_truth.csv")
    assert len(positive_pairs(gt)) == p["phase2_positives"]
    refs = set(list_images(root / "reference_images", "reference")[0])
    assert all(r in refs for _, r in positive_pairs(gt))
    assert "SYNTHETIC" in (root / "README.txt").read_text()
    assert json.loads((root / synthetic.MARKER).read_text())["params"]["edits"] == "moderate"
    assert not summary["reused"]


def test_synthetic_set_is_reused_and_deterministic(micro, tmp_path):
    root, _ = micro
    before = (root / "public_ground_truth.csv").read_text()
    assert synthetic.generate(root, preset="micro")["reused"]
    other = synthetic.generate(tmp_path / "again", preset="micro")
    assert not other["reused"]
    assert (tmp_path / "again" / "public_ground_truth.csv").read_text() == before
    a = augment.read_rgb(root / "query_images" / "Q00003.jpg")
    b = augment.read_rgb(tmp_path / "again" / "query_images" / "Q00003.jpg")
    assert np.array_equal(a, b)
    # another seed, another set
    synthetic.generate(tmp_path / "seed1", preset="micro", seed=1)
    assert (tmp_path / "seed1" / "public_ground_truth.csv").read_text() != before


def test_a_half_written_set_is_written_again(micro, tmp_path):
    root = tmp_path / "half"
    synthetic.generate(root, preset="micro")
    (root / synthetic.MARKER).unlink()  # as if the writer died before finishing
    (root / "reference_images" / "R000001.jpg").unlink()
    assert not synthetic.generate(root, preset="micro")["reused"]
    assert (root / "reference_images" / "R000001.jpg").exists()


BUILD_AT_ONCE = """
import json, pathlib, sys, time
from data.isc import synthetic
from hpc_jobs.fsutil import build_lock
root, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
with build_lock(root):  # what each workflow's download stage does around its generator
    print(json.dumps(synthetic.generate(root, preset="micro")["reused"]))
"""


def test_two_launches_building_one_set_at_once_take_turns(tmp_path):
    """Two launches at once on one data root: without the lock both find the set missing and the
    second deletes what the first is writing; with it, one writes and the other reuses."""
    import subprocess
    import sys

    from tests.pipeline_helpers import REPO

    root, go = tmp_path / "data" / "micro", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_AT_ONCE, str(root), str(go)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(json.loads(out) for out, _ in outs) == [False, True], outs
    assert synthetic.is_complete(root)


def test_layout_check_and_bad_files(tmp_path, micro):
    root, _ = micro
    assert Disc21(root).check() == {}
    problems = Disc21(tmp_path).check()
    assert set(problems) == {"references", "training", "train_queries", "eval_queries", "train_ground_truth",
                             "eval_ground_truth"}
    bad = tmp_path / "gt.csv"
    bad.write_text("query,reference\nQ00001,R000001\n")
    with pytest.raises(LayoutError, match="header"):
        read_ground_truth(bad)
    bad.write_text("query_id,reference_id\nQ1,R000001\n")
    with pytest.raises(LayoutError, match="'Q1'"):
        read_ground_truth(bad)
    bad.write_text("query_id,reference_id\nQ00001,R000001\nQ00001,R000001\n")
    with pytest.raises(LayoutError, match="twice"):
        read_ground_truth(bad)
    folder = tmp_path / "reference_images"
    folder.mkdir()
    augment.write_jpeg(folder / "image1.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(LayoutError, match="image1"):
        list_images(folder, "reference")


def test_training_views_and_pairs(micro):
    root, _ = micro
    layout = Disc21(root)
    _, paths = list_images(layout.training, "training")
    refs = list_images(layout.references, "reference")[1]
    ds = datasets.TrainViews(paths, 48, (0.5,) * 3, (0.5,) * 3, ncrops=3, negative_paths=refs, extra_negatives=2)
    np.random.seed(0)
    images, labels = ds[5]
    assert images.shape == (5, 3, 48, 48) and images.dtype == torch.float32
    assert labels[:3].tolist() == [5, 5, 5] and all(l >= datasets.NEGATIVE_OFFSET for l in labels[3:].tolist())
    np.random.seed(0)
    again, _ = ds[5]
    assert torch.equal(images, again)  # the engine's per-sample seed makes the views reproducible
    queries, pos_refs, negatives = datasets.supervised_pairs(layout)
    assert len(queries) == synthetic.PRESETS["micro"]["query_positives"]
    assert not set(pos_refs) & set(negatives)
    pairs = datasets.GroundTruthPairs(queries, pos_refs, negatives, 32, (0.5,) * 3, (0.5,) * 3, negatives=3)
    images, labels = pairs[2]
    assert images.shape == (5, 3, 32, 32) and labels[:2].tolist() == [2, 2]
    with pytest.raises(ValueError, match="2 views"):
        datasets.TrainViews(paths, 48, (0.5,) * 3, (0.5,) * 3, ncrops=1)


def test_edits_keep_shapes_and_query_edits_name_themselves():
    rng = np.random.default_rng(0)
    image = synthetic.procedural_image(rng, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for _, op in [(f.__name__ if hasattr(f, "__name__") else "op", f) for f, _ in augment.PIXEL_OPS]:
        out = op(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
    hard = augment.hard_view(image, rng, 40, others=lambda: image, overlay_p=1.0)
    assert hard.shape == (40, 40, 3)
    for strength in ("moderate", "strong"):
        edited, names = augment.query_edit(image, rng, image, strength=strength)
        assert edited.ndim == 3 and names and len(set(names)) == len(names)
    with pytest.raises(ValueError, match="strength"):
        augment.query_edit(image, rng, image, strength="extreme")


def _unit(*rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_database_side_augmentation_by_hand():
    train = _unit([1, 0], [0.6, 0.8], [0, 1])
    out = dba.database_side_augmentation(train, k=2, alpha=3.0)
    # t0's neighbours: itself (sim 1) and t1 (0.6): [1, 0] + 0.6^3 [0.6, 0.8]
    # t1's: itself and t2 (0.8 > 0.6): [0.6, 0.8] + 0.8^3 [0, 1]
    # t2's: itself and t1 (0.8; t0 is at 0): [0, 1] + 0.8^3 [0.6, 0.8]
    expect = _unit([1 + 0.216 * 0.6, 0.216 * 0.8], [0.6, 0.8 + 0.512], [0.512 * 0.6, 1 + 0.512 * 0.8])
    np.testing.assert_allclose(out, expect, atol=1e-6)


def test_negative_embedding_subtraction_by_hand():
    x = _unit([0.8, 0.6])
    negatives = _unit([1, 0], [0, 1])
    out = nes.negative_embedding_subtraction(x, negatives, k=1, beta=0.5)
    np.testing.assert_allclose(out, _unit([0.8 - 0.5, 0.6]), atol=1e-6)  # nearest negative: [1, 0]
    both = nes.negative_embedding_subtraction(x, negatives, k=2, beta=0.5)
    np.testing.assert_allclose(both, _unit([0.8 - 0.25, 0.6 - 0.25]), atol=1e-6)


def test_knn_and_rows():
    query = _unit([1, 0], [0, 1])
    reference = _unit([0, 1], [1, 0.1], [1, 1])
    scores, ind = knn.search(query, reference, k=2)
    assert ind.tolist() == [[1, 2], [0, 2]]
    assert scores[0, 0] == pytest.approx(-float(np.sum((query[0] - reference[1]) ** 2)), abs=1e-6)
    rows = postprocess.to_rows(["Q00000", "Q00001"], ["R000000", "R000001", "R000002"], scores, ind)
    assert [r[:2] for r in rows] == [("Q00000", "R000001"), ("Q00000", "R000002"), ("Q00001", "R000000"),
                                     ("Q00001", "R000002")]
    scores, ind = knn.search(query, reference, k=10)  # k above the database size: capped
    assert ind.shape == (2, 3)
    out = postprocess.postprocess(query, reference, reference, k=2, dba_k=2, nes_k=1)
    assert out["indices"].shape == (2, 2) and out["raw_indices"].tolist() == [[1, 2], [0, 2]]
    np.testing.assert_allclose(np.linalg.norm(out["query"], axis=1), 1.0, atol=1e-6)


def test_download_listing_is_parsed():
    from data.isc.download import parse_listing

    xml = """<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <IsTruncated>true</IsTruncated><NextContinuationToken>abc</NextContinuationToken>
  <Contents><Key>all/query_images/</Key><Size>0</Size></Contents>
  <Contents><Key>all/query_images/Q00000.jpg</Key><Size>123</Size></Contents>
</ListBucketResult>"""
    assert parse_listing(xml) == ([("all/query_images/Q00000.jpg", 123)], "abc")


def test_download_resumes_partial_parts_and_leaves_user_data_alone(tmp_path, monkeypatch):
    """Against a fake bucket (no network): objects already whole are not fetched again, a part
    whose download was cut short is finished, a folder the user brought is not touched."""
    from data.isc import download as dl

    objects = {"all/query_images/Q00000.jpg": b"abc", "all/query_images/Q00001.jpg": b"defg"}
    fetched = []

    def fake_get(url, timeout=60.0, retries=4):
        if "?" in url:  # a listing
            body = "".join(f"<Contents><Key>{k}</Key><Size>{len(v)}</Size></Contents>" for k, v in objects.items())
            return (f'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"<IsTruncated>false</IsTruncated>{body}</ListBucketResult>").encode()
        key = url.split(".com/", 1)[1]
        fetched.append(key)
        return objects[key]

    monkeypatch.setattr(dl, "_get", fake_get)
    parts = {"all/query_images/": "query_images", "all/reference_images/": "reference_images"}
    (tmp_path / "reference_images").mkdir()  # the user's own copy
    assert dl.missing_parts(tmp_path, parts) == {"all/query_images/": "query_images"}
    (tmp_path / "query_images").mkdir()
    (tmp_path / "query_images" / "Q00000.jpg").write_bytes(b"abc")  # already whole
    (tmp_path / ".query_images.downloading").write_text("x")  # an earlier run was cut short
    assert dl.missing_parts(tmp_path, parts) == {"all/query_images/": "query_images"}
    report = dl.download_disc21(tmp_path, parts=dl.missing_parts(tmp_path, parts), workers=2)
    assert report == {"query_images": {"objects": 2, "fetched": 1}}
    assert fetched == ["all/query_images/Q00001.jpg"]
    assert (tmp_path / "query_images" / "Q00001.jpg").read_bytes() == b"defg"
    assert dl.missing_parts(tmp_path, parts) == {}
