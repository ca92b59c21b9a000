"""`python launch.py isc --cluster local --gpus 1`: the whole chain on the synthetic set, on this
machine; the same pipeline with training skipped (`--set train.epochs=0`) is the baseline the
trained one must clearly beat. The two run side by side, each in its own home (the trained chain is
one rank with one torch thread: the baseline takes the other core)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.pipeline_helpers import cli, status_json, trained_and_untrained, workflow_lines

STAGES = ("download", "train_v83", "train_v83_cont", "train_v86", "train_v98", "train_v107", "extract",
          "postprocess", "eval")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_and_untrained(tmp_path_factory, "isc", gpus=1, timeout=900)


def _run_dir(home: Path, run: str) -> Path:
    return Path(json.loads(cli(home, "status", run, "--json").stdout)["run_dir"])


def test_every_stage_completes_and_v83_cont_resumes_at_epoch_5(runs):
    home, _, trained, _ = runs
    lines = workflow_lines(trained.stdout)
    assert lines[0].startswith("[download] isc: no DISC21 data configured: using the SYNTHETIC set"), lines[:2]
    states = status_json(home, "trained")
    assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in STAGES}
    log = (_run_dir(home, "trained") / "stages" / "train_v83_cont" / "local" / "rank0.log").read_text()
    assert "train_v83_cont: resumed train_v83 at epoch 5 (step 60;" in log, log[:2000]
    assert "resumed from" in log and "at step 60" in log  # the engine's own line agrees
    assert "epoch 6/10" in log and "epoch 1/10" not in log  # it went on from epoch 6, not from scratch
    # status names each handoff
    assert states["train_v83_cont"]["result"]["handoff"] == "resume train_v83"
    assert states["train_v86"]["result"]["handoff"] == "init train_v83_cont"
    assert states["train_v107"]["result"]["handoff"] == "init train_v98"
    assert states["train_v107"]["result"]["epoch"] == 6


def test_training_clearly_beats_the_untrained_chain(runs):
    home, base, trained, untrained = runs
    ok = status_json(base, "untrained")
    assert {k: v["state"] for k, v in ok.items()} == {s: "COMPLETED" for s in STAGES}
    assert "train_v83: no training (epochs=0): handing on its starting weights" in untrained.stdout
    uap = status_json(home, "trained")["eval"]["result"]["uap"]
    uap0 = ok["eval"]["result"]["uap"]
    print(f"uAP trained {uap:.4f} vs epochs=0 {uap0:.4f}")
    assert uap > 0.35 and uap > uap0 + 0.2, (uap, uap0)


def test_outputs_have_the_seed_formats(runs):
    import h5py

    home, _, trained, _ = runs
    run_dir = _run_dir(home, "trained")
    with h5py.File(run_dir / "stages" / "extract" / "descriptors.h5") as f:
        assert {"query", "reference", "train", "query_ids", "reference_ids"} <= set(f)
        assert f["query"].shape == (150, 256) and f["reference"].shape == (300, 256) and f["train"].shape == (600, 256)
        assert f["query_ids"][0].decode().startswith("Q") and f["reference_ids"][0] == b"R000000"
    with open(run_dir / "stages" / "postprocess" / "predictions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["query_id", "reference_id", "score"] and len(rows) - 1 == 150 * 10
    metrics = json.loads((run_dir / "stages" / "eval" / "metrics.json").read_text())
    assert {"uap", "recall_p90", "raw", "positives"} <= set(metrics) and metrics["positives"] == 100
    assert "isc eval: uAP" in trained.stdout
