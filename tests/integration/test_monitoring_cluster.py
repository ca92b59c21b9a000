"""Watching and debugging on the real dev cluster: the shared poller's call count with 1, 50 and
500 real jobs, failure triage and requeue/resume attempts in ``logs``, ``logs -f`` ending with the
stage, ``status --watch``, ``report``, and interactive ``debug`` sessions through a pseudo-terminal.

The measurement behind the polling numbers in docs/monitoring.md lives in
benchmarks/poll_bench.py (``python -m benchmarks.poll_bench``, also a section of
``python -m benchmarks``); this module uses its counting shim and held arrays, and still runs it
by hand:

    python -m tests.integration.test_monitoring_cluster measure [--real-seconds S] [--no-simulation]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Dict

import pytest

from benchmarks.poll_bench import count_calls, make_shim, submit_held_array
from tests.pipeline_helpers import REPO, cli, launch_json, status_json, states_of

from .conftest import JOBS_ROOT, run, sacct

DEMO_FAST = ("--set", "epochs=5", "--set", "more_epochs=5")


@pytest.fixture
def home():
    path = JOBS_ROOT / f"mon-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


# -- 1. the poller's call count with real jobs ---------------------------------------------------
def test_poller_calls_do_not_grow_with_1_50_500_real_jobs(slurm_cluster, tmp_path, monkeypatch, job_name):
    from hpc_jobs.poller import Poller, PollerConfig

    shim = make_shim(tmp_path / "shim")
    count = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HJ_COUNT", str(count))
    sizes = (1, 50, 500)
    arrays = {n: submit_held_array(n, job_name) for n in sizes}
    try:
        # sacct lags a fresh submission (then a refresh costs sacct + squeue: 2 calls); measure the
        # steady state, once accounting has them all
        slurm_cluster.wait_for(lambda: all(sacct(a) for a in arrays.values()), 60, "sacct to list the arrays")
        seen: Dict[int, int] = {}
        for n in sizes:
            monkeypatch.setenv("HJ_CALLER", f"n{n}")
            ids = [f"{arrays[n]}_{i}" for i in range(n)]
            p = Poller(tmp_path / f"cache-{n}.json", PollerConfig(min_interval_s=0.5, max_interval_s=2.0))
            deadline = time.monotonic() + 6.0
            snap = None
            while time.monotonic() < deadline:
                snap = p.query(ids)
                time.sleep(0.05)
            assert len(snap.jobs) == n and {i.state for i in snap.jobs.values()} == {"PENDING"}, snap
            seen[n] = count_calls(count).get(f"n{n}", 0)
        # calls at 0, 0.5, 1.5, 3.5, 5.5 s: ONE sacct each, whatever the number of jobs
        assert max(seen.values()) - min(seen.values()) <= 1, seen
        assert all(4 <= c <= 6 for c in seen.values()), seen
    finally:
        run("scancel", *arrays.values())


# -- 2. a failing run: triage, attempts, logs -f, --watch, report --------------------------------
@pytest.fixture(scope="module")
def flaky_run():
    """The demo with train_more failing once, watched with ``status --watch``, then resumed."""
    home = JOBS_ROOT / f"mon-flaky-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    out = launch_json(home, "demo", "--cluster", "devcluster", "--run-name", "flaky", "--set", "fail_once=train_more",
                      *DEMO_FAST)
    watched = cli(home, "status", "flaky", "--watch", "--interval", "1", "--json", check=False, timeout=300)
    return {"home": home, "launch": out, "watched": watched}


def test_failed_stage_shows_slurm_state_exit_code_log_tail_and_hints(slurm_cluster, flaky_run):
    home, watched = flaky_run["home"], flaky_run["watched"]
    assert watched.returncode == 1, watched.stderr  # --watch returned when the run ended (with a failure)
    last = json.loads(watched.stdout.strip().splitlines()[-1])
    assert last["finished"] is True
    states = {s["name"]: s for s in last["stages"]}
    assert states_of(states) == {"fetch": "COMPLETED", "shard": "COMPLETED", "train": "COMPLETED",
                                 "train_more": "FAILED", "evaluate": "CANCELLED"}
    tm = states["train_more"]
    assert tm["exit_code"] and tm["exit_code"] != "0:0" and tm["raw_state"] == "FAILED"
    assert any("injected failure" in line for line in tm["log_tail"]), tm["log_tail"]
    assert tm["hint"]["cause"] == "error" and "python launch.py logs flaky train_more" in tm["hint"]["hint"]
    ev = states["evaluate"]
    assert ev["hint"]["cause"] == "dependency" and "'train_more'" in ev["hint"]["hint"]
    text = cli(home, "status", "flaky").stdout
    assert "hint: never ran: upstream stage 'train_more' did not complete" in text
    assert "injected failure in stage train_more" in text and "exit code" in text


def test_resume_then_logs_by_attempt_and_follow(slurm_cluster, flaky_run):
    home = flaky_run["home"]
    cli(home, "resume", "flaky")
    follow = cli(home, "logs", "flaky", "train_more", "-f", timeout=240)  # waits for the new job, ends with it
    assert "[stage ended: COMPLETED]" in follow.stdout, follow.stdout[-2000:]
    assert "Job completed successfully" in follow.stdout or "completed" in follow.stdout
    cli(home, "status", "flaky", "--watch", "--interval", "1", timeout=240)
    states = status_json(home, "flaky")
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    first = cli(home, "logs", "flaky", "train_more", "--attempt", "1").stdout
    second = cli(home, "logs", "flaky", "train_more", "--attempt", "2").stdout
    assert "injected failure" in first and "injected failure" not in second
    assert "resubmitted (resume)" in second
    both = cli(home, "logs", "flaky", "train_more").stdout
    assert "2 attempts" in both
    shard = cli(home, "logs", "flaky", "shard", "--task", "2").stdout
    assert re.search(r"_2_0_log\.(out|err)", shard) is None or "Starting with JobEnvironment" in shard


def test_report_after_the_run(slurm_cluster, flaky_run):
    home = flaky_run["home"]
    path = Path(cli(home, "report", "flaky").stdout.strip())
    text = path.read_text()
    assert "| evaluate | COMPLETED |" in text and "abs_error" in text and "## Curves" in text


# -- 3. interactive debug sessions through a pty -------------------------------------------------
@pytest.fixture(scope="module")
def source_run():
    home = JOBS_ROOT / f"mon-src-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    launch_json(home, "demo", "--cluster", "devcluster", "--run-name", "src", *DEMO_FAST)
    cli(home, "status", "src", "--watch", "--interval", "1", timeout=300)
    return home


def _spawn(home: Path, *args: str):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, HPC_JOBS_HOME=str(home), PYTHONUNBUFFERED="1", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["launch.py", "debug", "demo", *args], cwd=str(REPO), env=env,
                          encoding="utf-8", timeout=120, dimensions=(50, 200))
    return pexpect, child


def test_debug_breakpoint_in_an_allocation(slurm_cluster, source_run):
    pexpect, child = _spawn(source_run, "--stage", "train", "--cluster", "devcluster", "--from-run", "src",
                            "--break", "--run-name", "dbg-break", *DEMO_FAST)
    try:
        child.expect(r"salloc: Granted job allocation (\d+)")
        job_id = child.match.group(1)
        child.expect(r"\(Pdb\)")
        child.sendline("import os; print('IN', os.environ['SLURM_JOB_ID'], os.environ['HPC_JOBS_STAGE'], os.getcwd())")
        child.expect(rf"IN {job_id} train (\S+)")
        assert child.match.group(1).endswith("/runs/demo/dbg-break")
        child.sendline("c")
        child.expect("stage train completed")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    data = json.loads(cli(source_run, "status", "dbg-break", "--json").stdout)
    st = {s["name"]: s for s in data["stages"]}
    assert data["debug"] is True and st["train"]["state"] == "COMPLETED"
    assert st["train"]["job_ids"] == [job_id] and st["train"]["result"]["step"] == 5
    # right after an allocation ends, sacct can show a partial record (no partition, a default
    # name) for a few seconds: wait for the whole one
    deadline = time.monotonic() + 30
    rec = sacct(job_id)
    while not (rec and rec[0]["Partition"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        rec = sacct(job_id)
    assert rec and rec[0]["JobName"] == "demo.train.debug" and rec[0]["Partition"] == "batch"


def test_debug_shell_has_the_batch_jobs_environment(slurm_cluster, source_run):
    pexpect, child = _spawn(source_run, "--stage", "train_more", "--cluster", "devcluster", "--from-run", "src",
                            "--shell", "--run-name", "dbg-shell", *DEMO_FAST)
    try:
        child.expect("exit to release")
        child.sendline('echo "ENV:$HPC_JOBS_STAGE:$SLURM_JOB_ID:$SLURM_CPUS_PER_TASK:${PYTHONPATH%%:*}:$OMP_NUM_THREADS"')
        child.expect(r"ENV:train_more:(\d+):1:(\S+?):1")
        assert child.match.group(2).endswith("/runs/demo/dbg-shell/code")
        child.sendline("$HPC_JOBS_DEBUG_CMD")  # the stage itself, in the shell
        child.expect("stage train_more completed")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    st = status_json(source_run, "dbg-shell")
    assert st["train_more"]["state"] == "COMPLETED" and st["train_more"]["result"]["step"] == 10  # resumed src's 5


if __name__ == "__main__":  # the measurement moved to benchmarks/poll_bench.py; this entry still runs it
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        from benchmarks.poll_bench import main

        sys.exit(main(sys.argv[1:] + ["--json"]))
    print(__doc__)
