"""The launch path's early work (hpc_jobs.launch._Prefetch): the code snapshot copied while the plan
is checked, moved into the run once preflight passed, and removed when it did not."""

from __future__ import annotations

import pytest

from hpc_jobs.errors import PreflightError, UserError
from hpc_jobs.launch import LaunchRequest, launch
from hpc_jobs.profiles import ClusterProfile
from hpc_jobs.workflow import LaunchOptions


def _dry(tmp_path, monkeypatch, **opts):
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path))
    monkeypatch.setattr(ClusterProfile, "runs_root", property(lambda self: tmp_path / "runs"))
    return LaunchRequest(workflow="demo", cluster="discovery", dry_run=True,
                         options=LaunchOptions(account="acct", **opts))


def test_the_snapshot_copied_early_becomes_the_runs_code(tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo").mkdir(parents=True)  # an earlier run made the folder
    result = launch(_dry(tmp_path, monkeypatch), echo=lambda s: None)
    code = result.run.dir / "code"
    assert (code / "hpc_jobs" / "launch.py").is_file() and (code / "launchers" / "demo.py").is_file()
    assert (code / "templates" / "sbatch.sh.j2").is_file()
    assert not list(code.rglob("__pycache__"))
    assert [p.name for p in (tmp_path / "runs" / "demo").iterdir()] == [result.run.id]  # no copy left


def test_a_failed_preflight_leaves_no_copy_behind(tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    with pytest.raises(PreflightError, match="partition 'nope' does not exist"):
        launch(_dry(tmp_path, monkeypatch, partition="nope"), echo=lambda s: None)
    assert list((tmp_path / "runs" / "demo").iterdir()) == []


def test_a_first_launch_creates_no_folder_before_preflight(tmp_path, monkeypatch):
    with pytest.raises(PreflightError):
        launch(_dry(tmp_path, monkeypatch, partition="nope"), echo=lambda s: None)
    assert not (tmp_path / "runs").exists()
    result = launch(_dry(tmp_path, monkeypatch), echo=lambda s: None)  # then copied after preflight
    assert (result.run.dir / "code" / "hpc_jobs" / "launch.py").is_file()


def test_resume_decides_on_a_fresh_answer(tmp_path, monkeypatch):
    """status may serve an answer up to 600 s old while the jobs report themselves; whether a stage
    is still queued (an admin may have cancelled it) is asked of the scheduler when resuming."""
    from hpc_jobs import launch as launchmod, status

    result = launch(_dry(tmp_path, monkeypatch), echo=lambda s: None)
    asked = []

    def states(run, triage=True, now=None, fresh=False):
        asked.append(fresh)
        return {n: status.StageState(name=n, state="PENDING") for n in run.order}

    monkeypatch.setattr(status, "stage_states", states)
    with pytest.raises(UserError, match="still queued or running"):  # nothing is submitted
        launchmod.resume(result.run, echo=lambda s: None)
    assert asked == [True]


def test_a_cli_launch_looks_the_workflow_up_once(tmp_path, monkeypatch, capsys):
    """Each lookup reads every installed package's entry points: the CLI's one is handed on."""
    from hpc_jobs import cli, workflow

    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path))
    calls = []
    real = workflow.get

    def get(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(workflow, "get", get)
    assert cli.main(["demo", "--cluster", "local", "--dry-run", "--json"]) == 0
    assert calls == ["demo"]
