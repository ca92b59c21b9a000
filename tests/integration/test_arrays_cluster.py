"""Arrays and a mid-pipeline login step on the real dev cluster (the folds example workflow).

One run with compute nodes that have no internet: task 1 of the training array fails once; its
per-task dependent is cancelled by Slurm (aftercorr), tasks 0 and 2 and theirs complete; ``resume``
resubmits only task 1 of each array (``--array=1``) and the gather stage, leaving the completed
tasks' files alone; the login step waits, then runs here under ``resume --follow`` and the last
stage is submitted. A second run with ``compute_internet: true`` runs the login step as a job. A
third cancels one task of a running array."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.pipeline_helpers import REPO, cli, launch_json, status_json

from .conftest import JOBS_ROOT, run, sacct, wait_for


@pytest.fixture
def home():
    path = JOBS_ROOT / f"arrays-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _settled(home: Path, name: str, timeout: float = 240) -> dict:
    """Wait until no stage is queued or running; return status --json's stages."""
    def check():
        states = status_json(home, name)
        busy = [s for s in states.values() if s["state"] in ("PENDING", "RUNNING", "REQUEUED", "SUBMITTED", "UNKNOWN")]
        return None if busy else states
    return wait_for(check, timeout, f"run {name} to settle", poll=1.0)


def test_array_task_failure_resume_of_one_task_and_a_waiting_login_step(slurm_cluster, home):
    out = launch_json(home, "folds", "--cluster", "devcluster", "--run-name", "k", "--set", "fail_once=fit:1")
    stages = {s["name"]: s for s in out["stages"]}
    assert stages["publish"]["state"] == "WAITING_LOGIN" and stages["publish"]["job_ids"] == []
    assert stages["summary"]["state"] == "PLANNED" and "after the login step publish" in stages["summary"]["reason"]
    fit_id, refine_id, gather_id = (stages[s]["job_ids"][0] for s in ("fit", "refine", "gather"))
    deps = run("scontrol", "show", "job", refine_id).stdout
    assert f"aftercorr:{fit_id}" in deps, deps  # task i of refine waits for task i of fit
    assert f"afterok:{refine_id}" in run("scontrol", "show", "job", gather_id).stdout

    states = _settled(home, "k")
    assert states["fit"]["tasks"] == {"0": "COMPLETED", "1": "FAILED", "2": "COMPLETED"}, states["fit"]
    assert states["refine"]["tasks"]["0"] == "COMPLETED" and states["refine"]["tasks"]["2"] == "COMPLETED"
    assert states["refine"]["tasks"]["1"] in ("CANCELLED", "UNKNOWN"), states["refine"]["tasks"]
    assert states["gather"]["state"] == "CANCELLED" and states["publish"]["state"] == "WAITING_LOGIN"
    assert {r["JobID"]: r["State"] for r in sacct(fit_id)} == {
        f"{fit_id}_0": "COMPLETED", f"{fit_id}_1": "FAILED", f"{fit_id}_2": "COMPLETED"}
    status = cli(home, "status", "k", "fit").stdout
    assert f"{fit_id}_1" in status and "3 tasks: 2 COMPLETED, 1 FAILED" in status, status

    run_dir = Path(out["run_dir"])
    kept = {t: _files(run_dir / "stages" / "fit" / "tasks" / str(t)) for t in (0, 2)}
    proc = cli(home, "resume", "k", "--json")
    assert "resuming fit[1], refine[1], gather, publish, summary" in proc.stderr, proc.stderr
    new = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}
    new_fit, new_refine = new["fit"]["job_ids"][0], new["refine"]["job_ids"][0]
    assert new_fit != fit_id and new_refine != refine_id
    states = _settled(home, "k")
    # the scheduler ran task 1 alone, at its own index, and the gather stage again
    assert [r["JobID"] for r in sacct(new_fit)] == [f"{new_fit}_1"]
    assert [r["JobID"] for r in sacct(new_refine)] == [f"{new_refine}_1"]
    assert states["fit"]["state"] == "COMPLETED" and states["refine"]["state"] == "COMPLETED"
    assert states["gather"]["state"] == "COMPLETED" and states["publish"]["state"] == "WAITING_LOGIN"
    assert {t: _files(run_dir / "stages" / "fit" / "tasks" / str(t)) for t in (0, 2)} == kept
    fit_tasks = {t["index"]: t["job_id"] for t in states["fit"]["task_list"]}
    assert fit_tasks == {0: f"{fit_id}_0", 1: f"{new_fit}_1", 2: f"{fit_id}_2"}

    # the login step runs here once gather completed, then summary is submitted and followed
    proc = cli(home, "resume", "k", "--follow", timeout=240)
    assert "login step(s) publish ready: running here, then submitting summary" in proc.stdout, proc.stdout
    states = status_json(home, "k")
    assert {s: v["state"] for s, v in states.items()} == {s: "COMPLETED" for s in states}, states
    summary_id = states["summary"]["job_ids"][0]
    assert sacct(summary_id)[0]["JobName"] == "folds.summary"
    published = json.loads((run_dir / "stages" / "publish" / "published.json").read_text())
    assert published["folds"] == 3


def test_login_step_runs_as_a_job_where_compute_nodes_reach_the_internet(slurm_cluster, home, tmp_path):
    import yaml

    profiles = home / "config" / "hpc_jobs" / "profiles"
    profiles.mkdir(parents=True)
    data = yaml.safe_load((REPO / "templates" / "profiles" / "devcluster.yaml").read_text())
    data["compute_internet"] = True
    (profiles / "devnet.yaml").write_text(yaml.safe_dump(data))
    env = dict(os.environ, HPC_JOBS_HOME=str(home), XDG_CONFIG_HOME=str(home / "config"))
    proc = subprocess.run([sys.executable, "launch.py", "folds", "--cluster", "devnet", "--run-name", "net",
                           "--set", "folds=2", "--follow"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((home / "runs" / "folds" / "net" / "run.json").read_text())
    publish = record["stages"]["publish"]
    assert publish["where"] == "batch" and publish["state"] != "WAITING_LOGIN"
    job = publish["jobs"][0]["job_id"]
    row = sacct(job)[0]
    assert row["JobName"] == "folds.publish" and row["State"] == "COMPLETED", row


def test_cancel_one_task_of_a_running_array(slurm_cluster, home):
    out = launch_json(home, "folds", "--cluster", "devcluster", "--run-name", "c", "--set", "sleep_s=1")
    fit_id = {s["name"]: s for s in out["stages"]}["fit"]["job_ids"][0]
    wait_for(lambda: run("squeue", "-h", "-j", f"{fit_id}_1", "-o", "%T").stdout.strip() == "RUNNING", 60,
             "task 1 of fit to run", poll=0.3)
    proc = cli(home, "cancel", "c", "fit", "--task", "1")
    assert f"{fit_id}_1" in proc.stdout and f"{fit_id}_0" not in proc.stdout, proc.stdout
    states = _settled(home, "c", timeout=180)
    assert states["fit"]["tasks"] == {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED"}, states["fit"]
    bad = cli(home, "cancel", "c", "gather", "--task", "1", check=False)
    assert bad.returncode == 2 and "not an array" in bad.stderr
