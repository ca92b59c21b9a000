"""Watching and debugging on the real dev cluster: the shared poller's call count with 1, 50 and
500 real jobs, failure triage and requeue/resume attempts in ``logs``, ``logs -f`` ending with the
stage, ``status --watch``, ``report``, and interactive ``debug`` sessions through a pseudo-terminal.

Also the measurement behind the numbers in docs/monitoring.md, run by hand:

    python -m tests.integration.test_monitoring_cluster measure [--real-seconds S] [--no-simulation]

It submits the SAME held job arrays (1, 50, 500 tasks) through plain submitit, then counts the
``sacct``/``squeue`` calls (a counting shim on PATH) that submitit's own watcher and hpc-jobs'
poller make while they watch those jobs, for three ways of watching: one long-lived watcher
polling every second; a fresh process every 10 s (``watch -n 10``, cron, a notebook cell); three
terminals watching at once. Time is simulated (a fake clock drives both tools' timers over one
hour); every counted call is a real call to the cluster. ``--real-seconds`` also measures the
long-lived pattern in real time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from tests.pipeline_helpers import REPO, cli, launch_json, status_json, states_of

from .conftest import JOBS_ROOT, run, sacct

DEMO_FAST = ("--set", "epochs=5", "--set", "more_epochs=5")


@pytest.fixture
def home():
    path = JOBS_ROOT / f"mon-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


# -- a counting shim for sacct/squeue ------------------------------------------------------------
def make_shim(folder: Path) -> Path:
    """``sacct``/``squeue`` wrappers that log ``$HJ_CALLER tool`` to ``$HJ_COUNT``, then run the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    for tool in ("sacct", "squeue"):
        real = shutil.which(tool)
        assert real, f"no {tool} on PATH"
        path = folder / tool
        path.write_text(f'#!/bin/sh\necho "${{HJ_CALLER:-?}} {tool}" >> "$HJ_COUNT"\nexec {real} "$@"\n')
        path.chmod(0o755)
    return folder


def count_calls(count_file: Path) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    try:
        lines = count_file.read_text().splitlines()
    except FileNotFoundError:
        return counts
    for line in lines:
        caller = line.split()[0]
        counts[caller] = counts.get(caller, 0) + 1
    return counts


def submit_held_array(n: int, name: str) -> str:
    proc = run("sbatch", "--parsable", "--hold", f"--array=0-{n - 1}" if n > 1 else "--array=0", f"--job-name={name}",
               "--partition=batch", "--output=/dev/null", "--wrap=true")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


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


# -- the measurement (python -m tests.integration.test_monitoring_cluster measure) ----------------
class FakeTime:
    """A clock for submitit's watcher and our poller: an hour passes in seconds."""

    def __init__(self) -> None:
        self.t = time.time()

    def time(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _submit_with_submitit(folder: Path, n: int) -> List:
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition="batch", slurm_additional_parameters={"hold": True},
                         slurm_job_name="hj-measure")
    return ex.map_array(abs, range(n)) if n > 1 else [ex.submit(abs, 1)]


def measure(real_seconds: float = 0.0, simulate: bool = True) -> Dict[str, Dict[int, float]]:
    import submitit.core.core as sub_core
    from submitit.slurm.slurm import SlurmInfoWatcher

    from hpc_jobs.poller import Poller

    work = JOBS_ROOT / f"measure-{uuid.uuid4().hex[:6]}"
    shim = make_shim(work / "shim")
    count = work / "calls.log"
    os.environ["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
    os.environ["HJ_COUNT"] = str(count)
    sizes = (1, 50, 500)
    jobs = {n: _submit_with_submitit(work / f"sub{n}", n) for n in sizes}
    results: Dict[str, Dict[int, float]] = {}
    real_time = sub_core._time
    try:
        time.sleep(2)  # let sacct see them: the lag right after submission is not what we measure
        for n in sizes if simulate else ():
            ids = [j.job_id for j in jobs[n]]
            for pattern in ("A", "B", "C"):
                clock = FakeTime()
                sub_core._time = clock  # submitit's watcher reads time through this module attribute
                watchers = [SlurmInfoWatcher(delay_s=600) for _ in range(3 if pattern == "C" else 1)]
                pollers = [Poller(work / f"cache-{n}-{pattern}.json", clock=clock.time)
                           for _ in range(3 if pattern == "C" else 1)]
                for w in watchers:
                    for jid in ids:
                        w.register_job(jid)
                step = 10.0 if pattern == "B" else 1.0
                end = clock.t + 3600
                while clock.t < end:
                    for k, w in enumerate(watchers):
                        if pattern == "B":  # a fresh process: a fresh watcher, as after `import submitit`
                            w = SlurmInfoWatcher(delay_s=600)
                            for jid in ids:
                                w.register_job(jid)
                        os.environ["HJ_CALLER"] = f"submitit-{pattern}-{n}"
                        for jid in ids:  # `all(j.done() for j in jobs)` (done() asks the shared watcher)
                            w.is_done(jid, mode="standard")
                        os.environ["HJ_CALLER"] = f"hpcjobs-{pattern}-{n}"
                        p = Poller(pollers[k].path, clock=clock.time) if pattern == "B" else pollers[k]
                        p.query(ids)
                    clock.sleep(step)
                counts = count_calls(count)
                results.setdefault(f"submitit {pattern}", {})[n] = counts.get(f"submitit-{pattern}-{n}", 0)
                results.setdefault(f"hpc-jobs {pattern}", {})[n] = counts.get(f"hpcjobs-{pattern}-{n}", 0)
        sub_core._time = real_time
        if real_seconds:  # the long-lived pattern in real time, all sizes side by side
            watchers = {n: SlurmInfoWatcher(delay_s=600) for n in sizes}
            for n in sizes:  # as constructing or unpickling submitit Job objects does
                for job in jobs[n]:
                    watchers[n].register_job(job.job_id)
            pollers = {n: Poller(work / f"cache-real-{n}.json") for n in sizes}
            end = time.time() + real_seconds
            while time.time() < end:
                for n in sizes:
                    os.environ["HJ_CALLER"] = f"submitit-real-{n}"
                    for job in jobs[n]:
                        watchers[n].is_done(job.job_id, mode="standard")
                    os.environ["HJ_CALLER"] = f"hpcjobs-real-{n}"
                    pollers[n].query([job.job_id for job in jobs[n]])
                time.sleep(1)
            counts = count_calls(count)
            scale = 3600.0 / real_seconds
            for n in sizes:
                results.setdefault("submitit real", {})[n] = round(counts.get(f"submitit-real-{n}", 0) * scale, 1)
                results.setdefault("hpc-jobs real", {})[n] = round(counts.get(f"hpcjobs-real-{n}", 0) * scale, 1)
    finally:
        sub_core._time = real_time
        for n in sizes:
            run("scancel", jobs[n][0].job_id.split("_")[0])
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        secs = float(sys.argv[sys.argv.index("--real-seconds") + 1]) if "--real-seconds" in sys.argv else 0.0
        res = measure(secs, simulate="--no-simulation" not in sys.argv)
        print("scheduler calls per hour (sacct + squeue), same held jobs, 1 / 50 / 500 jobs")
        print("A: one long-lived watcher polling every 1 s; B: a fresh process every 10 s; C: 3 watchers at once")
        for key, row in res.items():
            print(f"{key:<16} " + "  ".join(f"{n}: {v}" for n, v in row.items()))
        print(json.dumps(res))
    else:
        print(__doc__)
