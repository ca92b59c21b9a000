"""A config sweep on the real dev cluster: `launch.py demo --sweep lr=... --sweep more_epochs=...`.

The grid's four points run as arrays (one job id per swept stage, tasks `JOBID_0..3` in sacct),
not as one job per point; the shared stages before the sweep run once. One point fails once:
`status` ranks the other three by their metric, `resume` resubmits only that point's tasks and
the ranking then has all four points."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.pipeline_helpers import cli, launch_json, status_json

from .conftest import JOBS_ROOT, sacct, wait_for

SWEPT = ("train", "train_more", "evaluate")


@pytest.fixture
def home():
    path = JOBS_ROOT / f"sweep-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _settled(home, name, timeout=240.0):
    def check():
        states = status_json(home, name)
        busy = [s for s in states.values() if s["state"] in ("PENDING", "RUNNING", "REQUEUED", "SUBMITTED", "UNKNOWN")]
        return None if busy else states
    return wait_for(check, timeout, f"run {name} to settle", poll=1.0)


def test_a_2x2_sweep_is_arrays_ranked_by_metric_and_resume_reruns_one_point(slurm_cluster, home):
    out = launch_json(home, "demo", "--cluster", "devcluster", "--run-name", "grid", "--set", "epochs=4",
                      "--sweep", "lr=0.1,0.5", "--sweep", "more_epochs=2,4", "--set", "fail_once=evaluate:3")
    stages = {s["name"]: s for s in out["stages"]}
    assert [p["values"] for p in sorted(out["sweep"]["points"], key=lambda p: p["index"])] == [{"lr": 0.1, "more_epochs": 2}, {"lr": 0.1, "more_epochs": 4},
                                                   {"lr": 0.5, "more_epochs": 2}, {"lr": 0.5, "more_epochs": 4}]
    assert all(len(stages[s]["job_ids"]) == 1 and stages[s]["array"] == 4 for s in SWEPT), stages
    assert stages["shard"]["array"] == 3  # the shared stage keeps its own array, once

    states = _settled(home, "grid")
    assert states["evaluate"]["tasks"] == {"0": "COMPLETED", "1": "COMPLETED", "2": "COMPLETED", "3": "FAILED"}
    evaluate_id = stages["evaluate"]["job_ids"][0]
    for stage in SWEPT:  # four tasks of one array per swept stage, not four jobs
        job = stages[stage]["job_ids"][0]
        assert sorted(r["JobID"] for r in sacct(job)) == [f"{job}_{i}" for i in range(4)], sacct(job)
    assert {r["JobID"]: r["State"] for r in sacct(evaluate_id)}[f"{evaluate_id}_3"] == "FAILED"

    proc = cli(home, "resume", "grid", "--json")
    assert "resuming evaluate[3]; reusing completed" in proc.stderr, proc.stderr
    new_id = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}["evaluate"]["job_ids"][0]
    _settled(home, "grid")
    assert [r["JobID"] for r in sacct(new_id)] == [f"{new_id}_3"]  # only the failed point ran again

    doc = json.loads(cli(home, "status", "grid", "--json").stdout)
    points = doc["sweep"]["points"]
    assert [p["state"] for p in points] == ["COMPLETED"] * 4
    values = [p["value"] for p in points]
    assert values == sorted(values) and points[0]["metric"] == "abs_error"  # best (lowest error) first
    assert points[0]["values"] == {"lr": 0.5, "more_epochs": 4}, points  # the most steps at the larger rate
    text = cli(home, "status", "grid").stdout
    assert "sweep: 4 points over lr, more_epochs" in text, text
