"""The launch path's early work (hpc_jobs.launch._Prefetch): the code snapshot copied while the plan
is checked, moved into the run once preflight passed, and removed when it did not."""

from __future__ import annotations

from pathlib import Path

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


def _code_tree(root, files, age_s=3600):
    import os
    import time

    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        old = time.time() - age_s
        os.utime(path, (old, old))


def test_a_snapshot_links_what_did_not_change_and_copies_what_did(tmp_path):
    """The next launch's snapshot: an unchanged file is a hard link to the previous copy (no data
    written), a changed one or one changed just before the last copy (racy) a new copy."""
    import os
    import time

    from hpc_jobs.ledger import _Linker

    def ignore(directory, names):
        return [n for n in names if n == "__pycache__"]

    src = tmp_path / "src"
    _code_tree(src, {"pkg/a.py": "A = 1\n", "pkg/sub/b.py": "B = 2\n", "pkg/c.py": "C = 3\n"})
    time.sleep(1.1)  # a source written (its inode changed) within 1 s before a copy is copied again
    first = _Linker(None)
    first.tree(src, tmp_path / "s1", Path('.'), ignore)
    assert (first.linked, first.copied) == (0, 3)

    (src / "pkg" / "c.py").write_text("C = 4\n")  # changed now: a new copy; and racy for the next one
    second = _Linker(tmp_path / "s1")
    second.tree(src, tmp_path / "s2", Path('.'), ignore)
    assert (second.linked, second.copied) == (2, 1)
    for rel in ("pkg/a.py", "pkg/sub/b.py"):
        assert os.stat(tmp_path / "s2" / rel).st_ino == os.stat(tmp_path / "s1" / rel).st_ino
    assert (tmp_path / "s2" / "pkg" / "c.py").read_text() == "C = 4\n"
    assert (tmp_path / "s1" / "pkg" / "c.py").read_text() == "C = 3\n"  # the older run keeps its code

    third = _Linker(tmp_path / "s2")  # c.py changed < 1 s before s2's copy of it: copied again
    third.tree(src, tmp_path / "s3", Path('.'), ignore)
    assert (third.linked, third.copied) == (2, 1)
    assert os.stat(tmp_path / "s3" / "pkg" / "c.py").st_ino != os.stat(tmp_path / "s2" / "pkg" / "c.py").st_ino
    assert sorted(p.name for p in (tmp_path / "s3").rglob("*.py")) == ["a.py", "b.py", "c.py"]


def test_a_launch_names_its_snapshot_for_the_next_one(tmp_path, monkeypatch):
    import os

    from hpc_jobs.ledger import last_snapshot

    first = launch(_dry(tmp_path, monkeypatch), echo=lambda s: None)
    assert last_snapshot(tmp_path / "runs") == first.run.dir / "code"
    second = launch(_dry(tmp_path, monkeypatch), echo=lambda s: None)
    assert last_snapshot(tmp_path / "runs") == second.run.dir / "code"
    a, b = (r.run.dir / "code" / "hpc_jobs" / "ledger.py" for r in (first, second))
    assert a.read_bytes() == b.read_bytes()
    assert os.stat(a).st_ino == os.stat(b).st_ino  # linked, not copied again
    import shutil

    shutil.rmtree(second.run.dir)  # the run it names is gone: the next launch copies everything
    assert last_snapshot(tmp_path / "runs") is None
    third = launch(_dry(tmp_path, monkeypatch), echo=lambda s: None)
    assert (third.run.dir / "code" / "hpc_jobs" / "ledger.py").read_bytes() == a.read_bytes()


def test_the_entry_points_are_read_again_when_an_install_changes_sys_path(tmp_path, monkeypatch):
    import importlib.metadata
    import os

    from hpc_jobs import workflow

    reads = []
    real = importlib.metadata.entry_points

    def counting(**kw):
        reads.append(kw)
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", counting)
    workflow.entry_points()
    first = len(reads)  # 0 when this process read them already
    workflow.entry_points()
    assert len(reads) == first and first <= 1  # the second read is the first's answer
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    workflow.entry_points()
    assert len(reads) == first + 1  # a new folder on sys.path: read again
    (site / "newpkg-1.0.dist-info").mkdir()  # as pip install does
    os.utime(site, ns=(os.stat(site).st_mtime_ns + 10**9,) * 2)
    workflow.entry_points()
    assert len(reads) == first + 2
    workflow.entry_points()
    assert len(reads) == first + 2
