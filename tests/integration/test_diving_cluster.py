"""diving on the dev cluster: separate Slurm jobs with dependencies; DDP over 2 ranks, and over
both nodes with --nodes 2."""

from __future__ import annotations

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
