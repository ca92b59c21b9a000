"""The same demo pipeline on the local backend: order, handoffs, failure, resume, ledger, lock."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hpc_jobs.errors import RunLockedError
from hpc_jobs.ledger import find_run
from tests.pipeline_helpers import cli, launch_json, states_of, status_json


def test_demo_runs_locally_with_handoffs(tmp_path):
    out = launch_json(tmp_path, "demo", "--cluster", "local", "--run-name", "loc")
    assert out["backend"] == "local" and not out["failed"]
    states = status_json(tmp_path, "loc")
    assert states_of(states) == {s: "COMPLETED" for s in states}
    assert states["evaluate"]["result"]["steps"] == 40
    assert states["evaluate"]["result"]["abs_error"] < 0.1
    assert set(states["shard"]["tasks"].values()) == {"COMPLETED"} and len(states["shard"]["tasks"]) == 3
    run_dir = Path(out["run_dir"])
    # the ledger
    record = json.loads((run_dir / "run.json").read_text())
    assert record["order"] == ["fetch", "shard", "train", "train_more", "evaluate"]
    for name in ("command.txt", "config.yaml", "profile.yaml", "code/hpc_jobs/spec.py", "code/launchers/demo.py"):
        assert (run_dir / name).exists(), name
    assert record["hpc_jobs_version"] and record["python"]
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    # every manifest verifies
    from hpc_jobs.checkpoint import verify_checkpoint

    verify_checkpoint(run_dir / "stages/train_more/checkpoints/last.pt")


def test_local_failure_and_resume_reruns_only_what_failed(tmp_path):
    proc = cli(tmp_path, "demo", "--cluster", "local", "--run-name", "f", "--set", "fail_once=train_more", check=False)
    assert proc.returncode == 1
    assert "injected failure" in proc.stdout
    states = status_json(tmp_path, "f")
    assert states_of(states) == {"fetch": "COMPLETED", "shard": "COMPLETED", "train": "COMPLETED",
                                 "train_more": "FAILED", "evaluate": "CANCELLED"}
    run_dir = find_run_dir(tmp_path, "f")
    train_ckpt = run_dir / "stages/train/checkpoints/last.pt"
    before = train_ckpt.stat().st_mtime_ns
    proc = cli(tmp_path, "resume", "f")
    assert "resuming train_more, evaluate" in proc.stdout
    states = status_json(tmp_path, "f")
    assert states_of(states) == {s: "COMPLETED" for s in states}
    assert train_ckpt.stat().st_mtime_ns == before
    assert states["evaluate"]["result"]["steps"] == 40
    # resuming a finished run changes nothing
    assert "nothing to resume" in cli(tmp_path, "resume", "f").stdout


def find_run_dir(home: Path, name: str) -> Path:
    os.environ["HPC_JOBS_HOME"] = str(home)
    try:
        return find_run(name).dir
    finally:
        del os.environ["HPC_JOBS_HOME"]


def test_a_second_launcher_of_the_same_run_is_refused(tmp_path, monkeypatch):
    cli(tmp_path, "demo", "--cluster", "local", "--run-name", "locked")
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path))
    run = find_run("locked")
    with run.lock("launch"):
        proc = cli(tmp_path, "resume", "locked", check=False)
        assert proc.returncode == 2
        assert "is locked (launch by" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
        with pytest.raises(RunLockedError):
            with run.lock("resume"):
                pass


@pytest.mark.parametrize("args,message", [
    (("nosuch",), "unknown workflow 'nosuch'"),
    (("demo", "--cluster", "mars"), "unknown cluster profile 'mars'"),
    (("demo", "--set", "epoch=3"), "unknown config key 'epoch'. Did you mean epochs"),
    (("demo", "--set", "lr=fast"), "config 'lr': 'fast' is not a number"),
    (("demo", "--gpus", "0"), "--gpus 0: give at least 1"),
    (("demo", "--gpus", "-2"), "--gpus -2"),
    (("demo", "--run-name", "../x"), "run name '../x' is invalid"),
    (("demo", "--run-name", "a b"), "run name 'a b' is invalid"),
    (("demo", "--cluster", "discovery", "--dry-run"), "requires an account: add --account"),
    (("demo", "--cluster", "discovery", "--account", "a", "--time", "3-00:00:00", "--dry-run"), "above partition 'main''s limit 2-00:00:00"),
    (("status", "nope"), "no run 'nope' found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = cli(tmp_path, *args, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))


def test_requeue_limit_stops_an_endless_loop(tmp_path, monkeypatch):
    """A stage that came back more often than max_requeues fails with a clear message."""
    import pickle

    from hpc_jobs.runtime import RUNNER_FILE, RequeueLimitError

    cli(tmp_path, "demo", "--cluster", "local", "--run-name", "loop")
    run_dir = find_run_dir(tmp_path, "loop")
    runner = pickle.loads((run_dir / "stages" / "train" / RUNNER_FILE).read_bytes())
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # as in a batch job that Slurm requeued 21 times
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(runner.max_requeues + 1))
    with pytest.raises(RequeueLimitError, match="requeued 21 times"):
        runner()
    marker = json.loads((run_dir / "stages" / "train" / "state.json").read_text())
    assert marker["state"] == "FAILED" and "limit 20" in marker["error"]
