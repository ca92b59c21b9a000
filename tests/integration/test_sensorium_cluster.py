"""sensorium on the dev cluster: `python launch.py sensorium --cluster devcluster` (tiny preset,
the synthetic set) submits train and distill as 7-task Slurm arrays, each distill task with an
aftercorr dependency on its own train task (visible in `scontrol show job` and the script, and
in sacct: distill task k starts after train task k ends), then predict (a 10-task array after
every fold) and ensemble; every job completes and the ensemble scores above chance. Each fold
trains one epoch: what is tested here is the arrays on Slurm; that the same code learns is
test_sensorium_local's."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.pipeline_helpers import cli, job_ids, launch_json, wait_run

from .conftest import JOBS_ROOT, sacct, wait_final

BATCH = ("train", "distill", "predict", "ensemble")
pytestmark = pytest.mark.timeout(1800)  # 7 folds x 2 experiments, one epoch each: 1-3 minutes on 2 cores


@pytest.fixture(scope="module")
def home():
    path = JOBS_ROOT / f"sensorium-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30).stdout


def test_fold_arrays_with_per_task_dependencies(slurm_cluster, home):
    out = launch_json(home, "sensorium", "--cluster", "devcluster", "--run-name", "folds", "--set", "train.epochs=1")
    ids = job_ids(out)
    assert ids["download"] == [] and all(len(ids[s]) == 1 for s in BATCH), ids
    train, distill, predict = ids["train"][0], ids["distill"][0], ids["predict"][0]
    # right after submission: each distill task's dependency is its own train task (aftercorr)
    shown = _scontrol(distill)
    assert f"Dependency=aftercorr:{train}_*" in shown, shown
    run_dir = Path(out["run_dir"])
    script = (run_dir / "stages" / "distill" / "job.sbatch").read_text()
    assert "#SBATCH --array=0-6" in script and f"--dependency=aftercorr:{train}" in script, script
    predict_script = (run_dir / "stages" / "predict" / "job.sbatch").read_text()
    dependency = next(line for line in predict_script.splitlines() if "--dependency=" in line)
    assert "#SBATCH --array=0-9" in predict_script and dependency.startswith("#SBATCH --dependency=afterok:")
    assert {train, distill} <= set(dependency.split("afterok:")[1].split(":")), dependency  # every fold

    states = wait_run(home, "folds", timeout=1500)
    assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in states}, states
    rows = {(stage, k): wait_final(f"{ids[stage][0]}_{k}") for stage in ("train", "distill") for k in range(7)}
    assert all(r["State"] == "COMPLETED" for r in rows.values()), rows
    for k in range(7):  # distill task k waited for train task k
        assert rows[("distill", k)]["Start"] >= rows[("train", k)]["End"], (k, rows[("train", k)], rows[("distill", k)])
    # ... and only for it: some distill task started before the last train task ended
    last_train_end = max(rows[("train", k)]["End"] for k in range(7))
    assert min(rows[("distill", k)]["Start"] for k in range(7)) < last_train_end, rows
    predict_rows = [wait_final(f"{predict}_{i}") for i in range(10)]
    assert all(r["State"] == "COMPLETED" for r in predict_rows)
    assert min(r["Start"] for r in predict_rows) >= max(rows[("distill", k)]["End"] for k in range(7))
    assert sacct(ids["ensemble"][0])[0]["State"] == "COMPLETED"

    logs = cli(home, "logs", "folds", "distill").stdout
    assert "teacher = train fold" in logs, logs[-2000:]
    result = states["ensemble"]["result"]["out_of_fold"]
    assert result["ensemble"] > 0.05, result  # one epoch: 0.09 measured (untrained: 0.02)
    metrics = json.loads(next((run_dir / "stages" / "ensemble").rglob("metrics.json")).read_text())
    assert set(metrics["splits"]) == {"out_of_fold", "live_test_main", "live_test_bonus", "final_test_main",
                                      "final_test_bonus"}


def test_a_failed_fold_leaves_the_other_folds_distilling_and_resume_reruns_it(slurm_cluster, home, monkeypatch):
    """Fold 1 of `train` fails (a fault drill): distill folds 0 and 2 still run (their own
    dependencies are met), distill fold 1, predict and ensemble do not. `resume` then trains fold
    1 and its dependents; the other folds' checkpoints stay as they were."""
    from hpc_jobs.checkpoint import read_manifest

    monkeypatch.setenv("SENSORIUM_FAIL_FOLDS", "1")
    out = launch_json(home, "sensorium", "--cluster", "devcluster", "--run-name", "drill", "--set", "data.num_folds=3",
                      "--set", "train.epochs=1")
    ids = job_ids(out)
    wait_run(home, "drill", timeout=1200)
    train_rows = [wait_final(f"{ids['train'][0]}_{k}") for k in range(3)]
    assert [r["State"] for r in train_rows] == ["COMPLETED", "FAILED", "COMPLETED"], train_rows
    distill = [sacct(f"{ids['distill'][0]}_{k}") for k in range(3)]
    assert distill[0][0]["State"] == "COMPLETED" and distill[2][0]["State"] == "COMPLETED", distill
    assert not distill[1] or distill[1][0]["State"] != "COMPLETED", distill  # never ran, or cancelled
    assert all(r["State"] != "COMPLETED" for r in sacct(ids["predict"][0]))
    run_dir = Path(out["run_dir"])

    def bests():
        return {(stage, p.parent.parent.name): read_manifest(p).sha256
                for stage in ("train", "distill") for p in (run_dir / "stages" / stage).rglob("fold_*/checkpoints/best.pt")}

    before = bests()
    assert set(before) == {("train", "fold_0"), ("train", "fold_2"), ("distill", "fold_0"), ("distill", "fold_2")}

    monkeypatch.delenv("SENSORIUM_FAIL_FOLDS")
    cli(home, "resume", "drill")
    states = wait_run(home, "drill", timeout=1200)
    assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in states}, states
    after = bests()
    assert len(after) == 6
    assert {k: after[k] for k in before} == before  # the folds that had finished were not trained again
    assert states["ensemble"]["result"]["out_of_fold"]["ensemble"] > 0.05
