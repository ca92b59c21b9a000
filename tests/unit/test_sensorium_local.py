"""`python launch.py sensorium --cluster local` (tiny preset, the synthetic set): download, the
train array, the distill array (fold k taught by train fold k's best), predict per experiment x
split, ensemble. The same chain with training skipped (`--set train.epochs=0`) is the baseline the
trained ensemble must clearly beat. The local backend runs an array's tasks two at a time on a
2-core machine, so this test uses 4 folds (the dev-cluster test runs the preset's 7 as Slurm array
tasks): about 2 minutes for both chains on an idle 2-core machine, longer on a busy one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline_helpers import cli, status_json, workflow_lines

STAGES = ("download", "train", "distill", "predict", "ensemble")
FOLDS = 4
SPLITS = ("out_of_fold", "live_test_main", "live_test_bonus", "final_test_main", "final_test_bonus")


pytestmark = pytest.mark.timeout(3600)  # two whole chains, one task at a time


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("sensorium-local")
    folds = f"data.num_folds={FOLDS}"
    trained = cli(home, "sensorium", "--cluster", "local", "--run-name", "trained", "--set", folds, timeout=2400)
    untrained = cli(home, "sensorium", "--cluster", "local", "--run-name", "untrained", "--set", folds,
                    "--set", "train.epochs=0", timeout=1200)
    return home, trained, untrained


def _run_dir(home: Path, run: str) -> Path:
    return Path(json.loads(cli(home, "status", run, "--json").stdout)["run_dir"])


def _metrics(home: Path, run: str) -> dict:
    return json.loads(next((_run_dir(home, run) / "stages" / "ensemble").rglob("metrics.json")).read_text())


def test_every_stage_and_fold_completes(runs):
    home, trained, untrained = runs
    assert workflow_lines(trained.stdout)[0].startswith(
        "[download] sensorium: no Sensorium data configured: using the SYNTHETIC set"), trained.stdout[:300]
    for run in ("trained", "untrained"):
        states = status_json(home, run)
        assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in STAGES}, (run, states)
    for k in range(FOLDS):
        assert f"distill fold {k}: teacher = train fold {k}'s best checkpoint" in trained.stdout
        assert f"[distill:{k}]" in trained.stdout and f"[train:{k}]" in trained.stdout
    assert "train fold 0: no training (epochs=0)" in untrained.stdout


def test_the_trained_ensemble_clearly_beats_the_untrained_chain(runs):
    home, _, _ = runs
    trained, untrained = _metrics(home, "trained")["out_of_fold"], _metrics(home, "untrained")["out_of_fold"]
    print(f"out-of-fold correlation trained {trained} vs epochs=0 {untrained}")
    assert set(trained) == {"true_batch_001", "distillation_001", "ensemble"}
    assert trained["ensemble"] > 0.15 and trained["ensemble"] > untrained["ensemble"] + 0.1, (trained, untrained)
    # averaging two experiments helps, or at worst costs little
    assert trained["ensemble"] >= max(trained["true_batch_001"], trained["distillation_001"]) - 0.01, trained


def test_best_checkpoints_are_the_ema_models_named_by_score(runs):
    from hpc_jobs.checkpoint import read_manifest
    from launchers.sensorium import best_model_path

    home, _, _ = runs
    run_dir = _run_dir(home, "trained")
    for stage in ("train", "distill"):
        folds = sorted((run_dir / "stages" / stage).rglob("fold_*/checkpoints/best.pt"))
        assert len(folds) == FOLDS, folds
        for best in folds:
            manifest = read_manifest(best)
            named = best_model_path(best.parent.parent)  # model-{epoch:03d}-{val_corr:.6f}.pth
            assert named.name == f"model-{manifest.epoch:03d}-{manifest.metrics['val_corr']:.6f}.pth", (best, named)
            import torch

            state = torch.load(best, map_location="cpu", weights_only=True)
            ema = state["task"]["ema"]["module"]
            saved = torch.load(named, map_location="cpu", weights_only=True)
            assert all(torch.equal(ema[k], saved[k]) for k in saved)  # the score and file are the EMA's


def test_predictions_cover_every_trial_of_every_split(runs):
    from data.sensorium import layout

    home, _, _ = runs
    run_dir = _run_dir(home, "trained")
    dataset = json.loads(next((run_dir / "stages" / "download").rglob("dataset.json")).read_text())
    mice = layout.load_mice(Path(dataset["root"]), FOLDS)
    metrics = _metrics(home, "trained")
    assert set(metrics["splits"]) == set(SPLITS)
    for split in SPLITS:
        want = {f"{m.name}/{t}" for m in mice
                for t in (m.labeled_trials() if split == "out_of_fold" else m.trials(split))}
        for folder in ("true_batch_001", "distillation_001", "distillation_001,true_batch_001"):
            path = next(run_dir.rglob(f"{folder}/{split}.npz"))
            with np.load(path) as npz:
                assert set(npz.files) == want, (folder, split)
                first = npz[sorted(want)[0]]
                assert first.ndim == 2 and np.isfinite(first).all() and (first > 0).all()
    # synthetic data keeps the responses of the unlabeled splits: the ensemble scores them too
    assert metrics["splits"]["final_test_main"]["ensemble"]["correlation"] > 0.1
