"""data/vsc: the synthetic set's VSC layout (videos, metadata, ground truth in seconds, noise and
distractor queries, DISC21 training images), the copied segment really is the reference's, the
layout check, and uniform frame sampling with times."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from data.vsc import synthetic
from data.vsc.frames import sample_frames, uniform_indices
from data.vsc.layout import LayoutError, VscLayout
from data.vsc.matches import read_matches


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("vsc") / "micro"
    summary = synthetic.generate(root, preset="micro", seed=0)
    return root, summary


def test_layout_metadata_and_ground_truth(micro):
    root, summary = micro
    layout = VscLayout(root)
    assert layout.check() == {}
    ids = {kind: layout.videos(kind)[0] for kind in ("query", "reference", "noise")}
    assert len(ids["query"]) == 4 and len(ids["reference"]) == 4 and len(ids["noise"]) == 2
    assert all(re.fullmatch(r"Q\d{6}", i) for i in ids["query"])
    assert all(re.fullmatch(r"R\d{6}", i) for i in ids["reference"] + ids["noise"])
    assert not set(ids["reference"]) & set(ids["noise"])  # noise videos are no reference
    with open(root / "train" / "train_matching_ground_truth.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["query_id", "ref_id", "query_start", "query_end", "ref_start", "ref_end"]
    gt = read_matches(layout.path("ground_truth"), ground_truth=True)
    assert len(gt) == summary["copied"] == 3  # one query of four copies nothing: a distractor
    assert {g.query_id for g in gt} < set(ids["query"]) and {g.ref_id for g in gt} <= set(ids["reference"])
    for g in gt:  # seconds, within both videos, the same length on both axes (the copy keeps the speed)
        assert 2 <= g.query_end - g.query_start <= 3 and g.query_end - g.query_start == pytest.approx(g.ref_end - g.ref_start)
    assert (root / "disc21" / "training_images").is_dir() and (root / "disc21" / "public_ground_truth.csv").is_file()
    assert "NOT the Video Similarity Challenge" in (root / "README.txt").read_text()
    assert synthetic.generate(root, preset="micro", seed=0)["reused"] is True


def test_a_copy_edits_every_frame_of_the_segment_the_same_way(micro):
    root, _ = micro
    layout = VscLayout(root)
    g = read_matches(layout.path("ground_truth"), ground_truth=True)[0]
    q = sample_frames(layout.path("query_dir") / f"{g.query_id}.mp4", 1000)
    assert q.step == pytest.approx(1 / 4) and len(q.times) == round(q.duration * 4)
    rng = np.random.default_rng(3)
    frame = synthetic.disc21.procedural_image(rng, 96)
    background = synthetic.disc21.procedural_image(rng, 64)
    out = synthetic.copy_edit(np.stack([frame] * 3), rng, background, "moderate", 64, 48)
    assert out.shape == (3, 48, 64, 3) and np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    again = synthetic.copy_edit(np.stack([frame]), np.random.default_rng(4), background, "moderate", 64, 48)
    assert not np.array_equal(out[0], again[0])  # another query: another edit


def test_layout_check_names_what_is_missing(tmp_path, micro):
    root, _ = micro
    assert set(VscLayout(tmp_path).check()) == {"query_dir", "query_metadata", "reference_dir", "reference_metadata",
                                                 "noise_dir", "noise_metadata", "ground_truth"}
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "train_query_metadata.csv").write_text("video_id\nQ100000\n")
    (tmp_path / "train" / "query").mkdir()
    with pytest.raises(LayoutError, match="Q100000.mp4"):
        VscLayout(tmp_path).videos("query")


def test_uniform_frames_and_times(micro):
    root, _ = micro
    assert uniform_indices(10, 4).tolist() == [1, 3, 6, 8]
    assert uniform_indices(3, 8).tolist() == [0, 1, 2]
    frames = sample_frames(VscLayout(root).videos("reference")[1][0], 8)
    assert frames.images.shape[1:] == (48, 64, 3) and frames.images.dtype == np.uint8
    assert len(frames.times) == 8 and np.all(np.diff(frames.times) > 0) and frames.times[-1] < frames.duration
    with pytest.raises(OSError, match="cannot open"):
        sample_frames(root / "nothing.mp4", 4)


def test_references_change_content_over_time(micro):
    """Every video is shots of several pictures: frames a shot apart differ far more than
    neighbouring frames of one shot (a copied segment has one place in its reference)."""
    root, _ = micro
    frames = sample_frames(VscLayout(root).videos("reference")[1][0], 1000).images.astype(np.float32)
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert steps.max() > 8 * np.median(steps), steps  # at least one cut, and pans are smooth between cuts


def test_copy_edit_views_are_the_image_and_a_copy_edit_of_it(micro):
    import torch

    from data.isc.layout import Disc21, list_images
    from data.vsc.train_views import CopyEditViews

    root, _ = micro
    _, paths = list_images(Disc21(root / "disc21").training, "training")
    np.random.seed(0)
    ds = CopyEditViews(paths, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), ncrops=3)
    images, labels = ds[2]
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [2, 2, 2]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    with pytest.raises(ValueError, match="strength"):
        CopyEditViews(paths, 32, (0.5,) * 3, (0.5,) * 3, strength="gentle")
