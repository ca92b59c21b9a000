"""diving on the dev cluster: separate Slurm jobs with dependencies; DDP over 2 ranks, and over
both nodes with --nodes 2."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.pipeline_helpers import cli, job_ids, launch_json, states_of, wait_run

from .conftest import JOBS_ROOT, sacct


@pytest.fixture(scope="module")
def home():
    path = JOBS_ROOT / f"diving-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path




def _quick(*extra):
    return ["--set", "epochs=2", "--set", "data.synthetic_preset=tiny", *extra]


def test_diving_runs_as_dependent_jobs_with_two_ranks(slurm_cluster, home):
    out = launch_json(home, "diving", "--gpus", "2", "--cluster", "devcluster", "--run-name", "two", *_quick())
    ids = job_ids(out)
    assert ids["download"] == [] and all(len(ids[s]) == 1 for s in ("prepare", "train", "eval"))
    states = wait_run(home, "two", timeout=400)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    rows = {s: sacct(ids[s][0])[0] for s in ("prepare", "train", "eval")}
    assert rows["train"]["Start"] >= rows["prepare"]["End"] and rows["eval"]["Start"] >= rows["train"]["End"]
    log = cli(home, "logs", "two", "train").stdout
    assert "ddp on 2 rank(s)" in log, log
    assert isinstance(states["eval"]["result"]["spearman"], float)


def test_diving_spans_both_nodes(slurm_cluster, home):
    out = launch_json(home, "diving", "--gpus", "1", "--nodes", "2", "--cluster", "devcluster", "--run-name", "nodes2",
                      *_quick("--set", "evaluate=false"))
    ids = job_ids(out)
    states = wait_run(home, "nodes2", timeout=400)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    assert sacct(ids["train"][0])[0]["NodeList"] == "n[1-2]"
    assert "ddp on 2 rank(s)" in cli(home, "logs", "nodes2", "train").stdout


def test_a_2x2_diving_sweep_is_one_array_per_swept_stage_with_four_ranked_points(slurm_cluster, home):
    """`--sweep learning_rate=... --sweep batch_size=...`: prepare runs once; train and eval are
    4-task arrays (one job id each, tasks JOBID_0..3 in sacct); status ranks 4 points by Spearman."""
    out = launch_json(home, "diving", "--gpus", "1", "--cluster", "devcluster", "--run-name", "grid", *_quick(),
                      "--sweep", "learning_rate=3e-4,1e-3", "--sweep", "batch_size=4,8")
    stages = {s["name"]: s for s in out["stages"]}
    assert stages["prepare"]["array"] is None and len(stages["prepare"]["job_ids"]) == 1, stages["prepare"]
    assert all(stages[s]["array"] == 4 and len(stages[s]["job_ids"]) == 1 for s in ("train", "eval")), stages
    states = wait_run(home, "grid", timeout=400)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    for stage in ("train", "eval"):
        job = stages[stage]["job_ids"][0]
        assert sorted(r["JobID"] for r in sacct(job)) == [f"{job}_{i}" for i in range(4)], sacct(job)
    doc = json.loads(cli(home, "status", "grid", "--json").stdout)["sweep"]
    assert doc["metric"] == "spearman" and doc["mode"] == "max" and doc["stages"] == ["train", "eval"]
    points = doc["points"]
    assert sorted(p["index"] for p in points) == [0, 1, 2, 3]
    assert {(p["values"]["learning_rate"], p["values"]["batch_size"]) for p in points} == {
        (3e-4, 4), (3e-4, 8), (1e-3, 4), (1e-3, 8)}
    values = [p["value"] for p in points]
    assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in values), points
    assert values == sorted(values, reverse=True)  # best Spearman first
    text = cli(home, "status", "grid").stdout
    assert "sweep: 4 points over learning_rate, batch_size (stages train, eval), best spearman first" in text, text
