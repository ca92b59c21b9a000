"""`python launch.py product --cluster local --gpus 1`: the whole chain on the synthetic set, on
this machine (the data-prep arrays task by task, the login steps in their place); the same
pipeline with training skipped (`--set train.epochs=0`) is the baseline the trained one must
clearly beat (it runs beside the trained chain, in its own home). The cosine filter's report must
show it removed most injected wrong images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pipeline_helpers import cli, status_json, trained_and_untrained

# two whole chains (18 processes each), side by side, take about 3 minutes on an idle 2-core machine; the limit
# leaves room for a machine shared with other test runs
pytestmark = pytest.mark.timeout(1800)

STAGES = ("dataset", "get_pairs", "arcface_1", "arcface_2", "extract_features", "analyse_pairs", "download_images",
          "prepare_training_set", "xbm_1", "xbm_2", "xbm_3", "eval")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_and_untrained(tmp_path_factory, "product", gpus=1, timeout=1500)


def _run_dir(home: Path, run: str) -> Path:
    return Path(json.loads(cli(home, "status", run, "--json").stdout)["run_dir"])


def test_every_stage_and_task_completes_with_the_handoffs_logged(runs):
    home, _, trained, _ = runs
    assert "product: no data configured: using the SYNTHETIC set" in trained.stdout
    states = status_json(home, "trained")
    assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in STAGES}
    run_dir = _run_dir(home, "trained")
    for stage in ("get_pairs", "extract_features", "analyse_pairs"):  # one task directory per category
        tasks = sorted(p.name for p in (run_dir / "stages" / stage / "tasks").iterdir())
        assert tasks == ["0", "1", "2"], (stage, tasks)
    snapshots = sorted((run_dir / "stages" / "extract_features" / "tasks" / "0" / "snapshots").glob("*.npy"))
    assert len(snapshots) >= 3  # tiny snapshots every 24 images
    out = trained.stdout
    assert "extract_features: init_from" in out and "dropped arcface.weight (ArcFace head)" in out
    # each XBM phase starts from its predecessor's best; xbm_1 says what it dropped
    assert "xbm_1: starting from arcface_2's best checkpoint without its ArcFace head: dropped arcface.weight" in out
    assert "xbm_2: starting from xbm_1's best checkpoint" in out and "xbm_3: starting from xbm_2's best" in out
    assert states["xbm_1"]["result"]["handoff"] == "init arcface_2 (best val_map)"
    # the mid-pipeline login step copied the kept images and the training CSVs list them
    assert states["download_images"]["result"]["failed"] == 0
    table = (run_dir / "stages" / "prepare_training_set" / "amazon_review_mean_loose_full_images.csv").read_text()
    assert table.splitlines()[0] == "image_path,label" and len(table.splitlines()) > 50


def test_training_clearly_beats_the_untrained_chain_and_the_filter_works(runs):
    home, base, trained, untrained = runs
    states = status_json(base, "untrained")
    assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in STAGES}
    assert "arcface_1: no training (epochs=0): handing on its starting weights" in untrained.stdout
    metrics = json.loads((_run_dir(home, "trained") / "stages" / "eval" / "metrics.json").read_text())
    baseline = json.loads((_run_dir(base, "untrained") / "stages" / "eval" / "metrics.json").read_text())
    m, m0 = metrics["map_at_1000"], baseline["map_at_1000"]
    print(f"mAP@{metrics['k']} trained {m:.4f} vs epochs=0 {m0:.4f}; filter {json.dumps(metrics['filter'])}")
    assert metrics["k"] == metrics["gallery"] < 1000  # top-min(1000, gallery size)
    assert m > 0.35 and m > m0 + 0.15, (m, m0)
    assert set(metrics["filter"]) == {"0.5", "0.4"}  # the tiny preset's thresholds
    strict, loose = metrics["filter"]["0.5"], metrics["filter"]["0.4"]
    assert strict["wrong"] == loose["wrong"] == 3 * 14 * 2  # every injected wrong image was scored
    for f in (strict, loose):
        assert f["recall"] > 0.5 and f["right_kept_fraction"] > 0.5, f  # most wrong removed, most right kept
    assert loose["right_kept"] >= strict["right_kept"]
