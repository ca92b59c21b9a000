"""product on the dev cluster: `python launch.py product --cluster devcluster` (tiny preset, the
synthetic set). The data-prep stages are Slurm arrays (one task per category, `JOBID_k` in sacct),
task k of `extract_features` waits for task k of `get_pairs` (aftercorr), the compute nodes have
no internet so the mid-pipeline login step `download_images` waits, runs here under
`resume --follow` once the filter's tasks completed, and the rest is submitted; the five phases
(one epoch each: that the same code learns is test_product_local's) and eval complete."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.pipeline_helpers import cli, launch_json, status_json

from .conftest import JOBS_ROOT, run, sacct, wait_final, wait_for

ARRAYS = ("get_pairs", "extract_features", "analyse_pairs")
# 1-3 minutes on a 2-core machine; the limit leaves room for a cluster shared with other tests
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def home():
    path = JOBS_ROOT / f"product-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def test_product_arrays_login_step_and_phases_on_slurm(slurm_cluster, home):
    out = launch_json(home, "product", "--cluster", "devcluster", "--run-name", "vpr", "--set", "train.epochs=1")
    stages = {s["name"]: s for s in out["stages"]}
    assert stages["download_images"]["state"] == "WAITING_LOGIN" and stages["download_images"]["job_ids"] == []
    for name in ("prepare_training_set", "xbm_1", "xbm_2", "xbm_3", "eval"):  # after the login step
        assert stages[name]["job_ids"] == [], (name, stages[name])
    ids = {name: stages[name]["job_ids"][0] for name in (*ARRAYS, "arcface_1", "arcface_2")}
    deps = run("scontrol", "show", "job", ids["extract_features"]).stdout
    assert f"aftercorr:{ids['get_pairs']}" in deps and f"afterok:{ids['arcface_2']}" in deps, deps
    assert f"aftercorr:{ids['extract_features']}" in run("scontrol", "show", "job", ids["analyse_pairs"]).stdout

    # the login step runs once the filter's tasks completed: wait for the batch stages before it
    def settled():
        states = status_json(home, "vpr")
        busy = [n for n, s in states.items() if s["state"] in ("PENDING", "RUNNING", "REQUEUED", "SUBMITTED", "UNKNOWN")]
        return None if busy else states

    before = wait_for(settled, 1200, "the stages before the login step", poll=5.0)
    assert before["analyse_pairs"]["state"] == "COMPLETED" and before["download_images"]["state"] == "WAITING_LOGIN"
    proc = cli(home, "resume", "vpr", "--follow", timeout=1200)
    assert "login step(s) download_images ready: running here" in proc.stdout, proc.stdout[-3000:]
    states = status_json(home, "vpr")
    assert {s: v["state"] for s, v in states.items()} == {s: "COMPLETED" for s in states}, states
    for name in ARRAYS:  # real Slurm arrays: one task per category
        rows = {r["JobID"]: r["State"] for r in sacct(ids[name])}
        assert rows == {f"{ids[name]}_{k}": "COMPLETED" for k in range(3)}, (name, rows)
        assert states[name]["tasks"] == {str(k): "COMPLETED" for k in range(3)}
    later = {name: states[name]["job_ids"][0] for name in ("prepare_training_set", "xbm_1", "xbm_3", "eval")}
    ends = {name: wait_final(ids[name])["End"] for name in ("analyse_pairs", "arcface_2")}
    for name, job in later.items():
        assert wait_final(job)["State"] == "COMPLETED", name
    assert wait_final(later["prepare_training_set"])["Start"] >= ends["analyse_pairs"]  # after the login step
    assert wait_final(later["xbm_1"])["Start"] >= ends["arcface_2"]
    run_dir = Path(out["run_dir"])
    download = json.loads((run_dir / "stages" / "download_images" / "downloaded.json").read_text())
    assert len(download["files"]) == states["download_images"]["result"]["wanted"] > 0
    xbm1 = cli(home, "logs", "vpr", "xbm_1").stdout
    assert "dropped arcface.weight" in xbm1, xbm1[-2000:]
    metrics = json.loads((run_dir / "stages" / "eval" / "metrics.json").read_text())
    assert 0.0 < metrics["map_at_1000"] <= 1.0 and metrics["filter"]["0.4"]["wrong"] > 0, metrics["filter"]
    print(f"dev cluster: mAP@{metrics['k']} {metrics['map_at_1000']:.4f}, filter {json.dumps(metrics['filter'])}")
