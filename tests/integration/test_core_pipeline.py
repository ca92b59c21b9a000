"""The core against the real dev cluster: the demo pipeline (login stage, array of 3, resume and
init handoffs) submitted as Slurm jobs with dependencies, a failure cancelling descendants, and
``resume`` rerunning only what did not complete."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from tests.pipeline_helpers import cli, job_ids, launch_json, states_of, wait_run

from .conftest import JOBS_ROOT, sacct


@pytest.fixture
def home():
    path = JOBS_ROOT / f"core-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_demo_pipeline_on_the_cluster(slurm_cluster, home):
    out = launch_json(home, "demo", "--cluster", "devcluster", "--run-name", "ok")
    assert out["backend"] == "slurm" and out["cluster"] == "devcluster"
    ids = job_ids(out)
    assert ids["fetch"] == []  # login stage: ran at launch, no job
    assert all(len(ids[s]) == 1 for s in ("shard", "train", "train_more", "evaluate"))
    states = wait_run(home, "ok", timeout=240)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    # ordering, as the scheduler recorded it
    rec = {s: sacct(ids[s][0]) for s in ("shard", "train", "train_more", "evaluate")}
    assert len(rec["shard"]) == 3, rec["shard"]  # the array of 3 tasks
    shard_end = max(_t(r["End"]) for r in rec["shard"])
    assert _t(rec["train"][0]["Start"]) >= shard_end
    assert _t(rec["train_more"][0]["Start"]) >= _t(rec["train"][0]["End"])
    assert _t(rec["evaluate"][0]["Start"]) >= _t(rec["train_more"][0]["End"])
    assert all(r["State"] == "COMPLETED" for rows in rec.values() for r in rows)
    # the handoffs: train_more resumed train's step counter; evaluate got the final weights
    result = states["evaluate"]["result"]
    assert result["steps"] == 40, result
    assert result["abs_error"] < 0.1, result
    # job names read well in squeue/sacct
    assert rec["train"][0]["JobName"] == "demo.train"


def test_failure_cancels_descendants_and_resume_reruns_only_them(slurm_cluster, home):
    out = launch_json(home, "demo", "--cluster", "devcluster", "--run-name", "flaky", "--set", "fail_once=train_more")
    ids = job_ids(out)
    states = wait_run(home, "flaky", timeout=240)
    assert states_of(states) == {"fetch": "COMPLETED", "shard": "COMPLETED", "train": "COMPLETED",
                                 "train_more": "FAILED", "evaluate": "CANCELLED"}, states
    assert "injected failure" in states["train_more"]["error"]
    assert sacct(ids["evaluate"][0])[0]["State"] == "CANCELLED"
    run_dir = Path(out["run_dir"])
    ckpt = run_dir / "stages" / "train" / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns

    proc = cli(home, "resume", "flaky")
    assert "reusing completed fetch, shard, train" in proc.stdout, proc.stdout
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stages"]["train"]["jobs"][0]["job_id"] == ids["train"][0]  # not resubmitted
    assert record["stages"]["train_more"]["jobs"][0]["job_id"] != ids["train_more"][0]
    states = wait_run(home, "flaky", timeout=240)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    assert ckpt.stat().st_mtime_ns == before  # completed output reused, not recomputed
    assert states["evaluate"]["result"]["steps"] == 40


def test_dry_run_submits_nothing_and_preflight_rejects_bad_requests(slurm_cluster, home):
    out = launch_json(home, "demo", "--cluster", "devcluster", "--dry-run", "--run-name", "dry")
    assert out["dry_run"] and all(not s["job_ids"] for s in out["stages"])
    script = Path(out["stages"][1]["script"]).read_text()
    assert "#SBATCH --array=0-2%2" in script
    for args, message in [
        (("--partition", "nope"), "partition 'nope' does not exist on 'devcluster': use one of batch, high"),
        (("--time", "3-00:00:00"), "above partition 'batch''s limit 1-00:00:00"),
        (("--run-name", "a;b"), "run name 'a;b' is invalid"),
    ]:
        bad = cli(home, "demo", "--cluster", "devcluster", *args, check=False)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1, bad.stderr  # one line
    proc = cli(home, "demo", "--cluster", "devcluster", "--set", "epochs=many", check=False)
    assert proc.returncode == 2 and "not an int" in proc.stderr and proc.stderr.count("\n") == 1
    # Slurm's own answer (sbatch --test-only) comes while the run is recorded: a rejected launch
    # leaves no run behind, and the next launch's snapshot does not name it
    bad = cli(home, "demo", "--cluster", "devcluster", "--constraint", "nosuchfeature", "--run-name", "rejected",
              check=False)
    assert bad.returncode == 2 and "Slurm would reject the job" in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr
    runs = Path(out["run_dir"]).parent
    assert sorted(p.name for p in runs.iterdir()) == ["dry"]
    assert (runs.parent / ".last-code").read_text().strip() == "demo/dry/code"


def test_sbatch_refusing_a_resume_is_one_line_and_a_later_resume_recovers(slurm_cluster, home):
    """A real refusal: the run's partition is made INACTIVE before `resume`; sbatch rejects the job.
    The user sees one `error:` line naming the stage (no traceback), exit 1, and the ledger still
    lets a later `resume` submit it once the partition is back."""
    import subprocess

    part = f"gate{uuid.uuid4().hex[:4]}"
    subprocess.run(["scontrol", "create", f"PartitionName={part}", "Nodes=n1,n2", "State=UP", "MaxTime=30"],
                   check=True, capture_output=True)
    try:
        launch_json(home, "demo", "--cluster", "devcluster", "--partition", part, "--run-name", "gate",
                    "--set", "fail_once=train_more")
        states = wait_run(home, "gate", timeout=240)
        assert states_of(states)["train_more"] == "FAILED", states
        subprocess.run(["scontrol", "update", f"PartitionName={part}", "State=INACTIVE"], check=True)
        proc = cli(home, "resume", "gate", check=False)
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and "sbatch refused stage 'train_more'" in errors[0], proc.stderr
        assert "launch.py resume" in errors[0]
        subprocess.run(["scontrol", "update", f"PartitionName={part}", "State=UP"], check=True)
        cli(home, "resume", "gate")
        states = wait_run(home, "gate", timeout=240)
        assert states_of(states) == {s: "COMPLETED" for s in states}, states
    finally:
        subprocess.run(["scontrol", "delete", f"PartitionName={part}"], capture_output=True)


def test_preflight_checks_gpus_per_node_against_the_partitions_real_nodes(slurm_cluster, home):
    """A profile that claims 8 GPUs per node in `batch` does not fool preflight where Slurm answers:
    the nodes really have 2 (sinfo), so asking 4 is refused before anything is submitted."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.pipeline_helpers import REPO

    profiles = home / "config" / "hpc_jobs" / "profiles"
    profiles.mkdir(parents=True)
    data = yaml.safe_load((REPO / "templates" / "profiles" / "devcluster.yaml").read_text())
    data.update(partitions_from_scheduler=False, partitions={"batch": {"max_time": "1-00:00:00", "gpus_per_node": 8}})
    (profiles / "claims8.yaml").write_text(yaml.safe_dump(data))
    env = dict(os.environ, HPC_JOBS_HOME=str(home), XDG_CONFIG_HOME=str(home / "config"))
    proc = subprocess.run([sys.executable, "launch.py", "isc", "--cluster", "claims8", "--gpus", "4", "--dry-run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "partition 'batch' nodes have 2" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
