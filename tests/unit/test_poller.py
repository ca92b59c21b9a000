"""The shared scheduler poller: one call whatever the number of jobs, one cache for every process
of a user, backoff when nothing changes, squeue when accounting is off, unknown is not dead.

A fake ``sacct``/``squeue`` on PATH (a small Python script reading a JSON file of job states)
counts the calls; a fake clock drives the backoff without sleeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpc_jobs import poller as pollmod
from hpc_jobs.poller import Poller, PollerConfig
from hpc_jobs.slurm import JobInfo

FAKE = textwrap.dedent('''\
    #!{python}
    """Fake sacct/squeue: answers from $FAKE_SLURM/jobs.json, logs each call to calls.log."""
    import json, os, sys, time
    root = os.environ["FAKE_SLURM"]
    tool = os.path.basename(sys.argv[0])
    with open(os.path.join(root, "calls.log"), "a") as fh:
        fh.write(tool + "\\n")
    cfg = json.load(open(os.path.join(root, "jobs.json")))
    time.sleep(cfg.get("sleep", 0))
    args = sys.argv[1:]
    if tool == "sacct":
        if not cfg.get("accounting", True):
            print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
            sys.exit(1)
        ids = args[args.index("-j") + 1].split(",")
        hidden = set(cfg.get("sacct_lag", []))
    else:
        ids = list(cfg["jobs"])
        hidden = set(cfg.get("squeue_gone", []))
    for jid in ids:
        job = cfg["jobs"].get(jid)
        if job is None or jid in hidden:
            continue
        state, n = job["state"], job.get("array")
        if tool == "squeue":
            state = cfg.get("squeue_state", {{}}).get(jid, state)
        elapsed = "00:01:00" if state == "RUNNING" else "00:00:00"
        if tool == "sacct":
            if n and state == "PENDING":
                print(f"{{jid}}_[0-{{n - 1}}]|PENDING|00:00:00|0:0|None assigned|JobHeldUser")
            elif n:
                for t in range(n):
                    print(f"{{jid}}_{{t}}|{{state}}|{{elapsed}}|0:0|n1|None")
            else:
                print(f"{{jid}}|{{state}}|{{elapsed}}|{{job.get('exit', '0:0')}}|n1|None")
        else:
            if n and state == "PENDING":
                print(f"{{jid}}_[0-{{n - 1}}]|PENDING|0:00||JobHeldUser|{{jid}}|N/A")
            elif n:
                for t in range(n):
                    print(f"{{jid}}_{{t}}|{{state}}|1:00|n1|None|{{jid}}|{{t}}")
            else:
                print(f"{{jid}}|{{state}}|1:00|n1|None|{{jid}}|N/A")
''')


class FakeSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for tool in ("sacct", "squeue"):
            path = self.bin / tool
            path.write_text(FAKE.format(python=sys.executable))
            path.chmod(0o755)
        self.cfg = {"jobs": {}}
        self.save()

    def save(self) -> None:
        (self.root / "jobs.json").write_text(json.dumps(self.cfg))

    def set(self, **changes) -> None:
        self.cfg.update(changes)
        self.save()

    def calls(self, tool: str = "") -> int:
        try:
            lines = (self.root / "calls.log").read_text().split()
        except FileNotFoundError:
            return 0
        return len([l for l in lines if not tool or l == tool])

    def env(self) -> dict:
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(self.root)}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = FakeSlurm(tmp_path / "fake")
    for key, value in f.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path / "home"))
    return f


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _poller(tmp_path, clock, **cfg) -> Poller:
    return Poller(tmp_path / "home" / "cache" / "sched.json", PollerConfig(**cfg), clock=clock)


def _jobs(n: int):
    """n jobs as the ledger names them: one plain job, or an array of n tasks."""
    if n == 1:
        return {"100": {"state": "RUNNING"}}, ["100"]
    return {"200": {"state": "RUNNING", "array": n}}, [f"200_{i}" for i in range(n)]


@pytest.mark.parametrize("n", [1, 50, 500])
def test_calls_do_not_grow_with_the_number_of_jobs(fake, tmp_path, n):
    """A status read every second for 10 simulated minutes: the same few calls for 1, 50 or 500 jobs."""
    jobs, ids = _jobs(n)
    fake.set(jobs=jobs)
    clock = Clock()
    p = _poller(tmp_path, clock)
    for _ in range(600):
        snap = p.query(ids)
        clock.t += 1
    assert all(snap.jobs[i].state == "RUNNING" for i in ids)
    # calls at 0, 2, 6, 14, then every 30 s (30 ... 570): 4 + 19 = 23 in 600 s; ONE sacct each, no squeue
    assert fake.calls("sacct") == 23, fake.calls("sacct")
    assert fake.calls("squeue") == 0


def test_many_separate_jobs_are_one_call(fake, tmp_path):
    fake.set(jobs={str(1000 + i): {"state": "PENDING"} for i in range(500)})
    clock = Clock()
    p = _poller(tmp_path, clock)
    snap = p.query([str(1000 + i) for i in range(500)])
    assert len(snap.jobs) == 500 and fake.calls() == 1


def test_backoff_doubles_to_the_cap_and_resets_on_change(tmp_path):
    clock = Clock()
    state = {"100": "RUNNING"}
    calls = []

    def scheduler(ids, use_sacct):
        calls.append(clock.t - 1_000_000.0)
        return {j: JobInfo(j, state[j], state[j], "00:00:01", "0:0", "n1", "None") for j in ids}, "sacct", True, 1

    p = Poller(tmp_path / "c.json", PollerConfig(min_interval_s=2, max_interval_s=30), clock=clock, scheduler=scheduler)
    for t in range(0, 200):
        clock.t = 1_000_000.0 + t
        if t == 100:
            state["100"] = "COMPLETED"  # a change: the next call sees it, then polls fast again
        p.query(["100"])
    assert calls[:7] == [0, 2, 6, 14, 30, 60, 90], calls
    assert calls[7:10] == [120, 122, 126], calls  # change seen at 120 -> 2 s -> doubling again
    # a finished job is asked about for settle_s (120 s) more, then never again
    n = len(calls)
    for t in range(200, 2000, 7):
        clock.t = 1_000_000.0 + t
        p.query(["100"])
    assert calls[-1] <= 120 + 130 and len(calls) - n <= 4, calls


def test_invalidate_and_urgent_wait_only_the_minimum_interval(tmp_path):
    clock = Clock()
    calls = []

    def scheduler(ids, use_sacct):
        calls.append(clock.t - 1_000_000.0)
        return {j: JobInfo(j, "RUNNING", "RUNNING") for j in ids}, "sacct", True, 1

    p = Poller(tmp_path / "c.json", PollerConfig(min_interval_s=2, max_interval_s=30), clock=clock, scheduler=scheduler)
    for t in range(0, 40):
        clock.t = 1_000_000.0 + t
        p.query(["7"])
    assert calls == [0, 2, 6, 14, 30]
    clock.t = 1_000_000.0 + 31
    p.query(["7"], urgent=True)  # less than min_interval since the last call: still cached
    assert calls[-1] == 30
    clock.t = 1_000_000.0 + 33
    p.query(["7"], urgent=True)
    assert calls[-1] == 33
    clock.t = 1_000_000.0 + 40
    p.invalidate()
    p.query(["7"])
    assert calls[-1] == 40
    clock.t = 1_000_000.0 + 41
    p.query(["8"])  # a new id (just submitted) is asked at the next min interval
    assert calls[-1] == 40
    clock.t = 1_000_000.0 + 42
    snap = p.query(["8"])
    assert calls[-1] == 42 and snap.jobs["8"].state == "RUNNING"


def test_a_new_id_is_reported_pending_until_asked(tmp_path):
    clock = Clock()

    def scheduler(ids, use_sacct):
        return {j: JobInfo(j, "PENDING", "PENDING") for j in ids}, "sacct", True, 1

    p = Poller(tmp_path / "c.json", PollerConfig(), clock=clock, scheduler=scheduler)
    p.query(["1"])
    clock.t += 0.5
    snap = p.query(["1", "2"])
    assert "2" in snap.pending and "2" not in snap.jobs and snap.jobs["1"].state == "PENDING"


def test_accounting_off_uses_one_squeue_and_missing_is_unknown(fake, tmp_path):
    fake.set(jobs={"300": {"state": "RUNNING"}, "301": {"state": "PENDING"}}, accounting=False)
    clock = Clock()
    p = _poller(tmp_path, clock)
    snap = p.query(["300", "301"])
    assert snap.jobs["300"].state == "RUNNING" and snap.source == "squeue"
    assert fake.calls("sacct") == 1 and fake.calls("squeue") == 1
    # 300 leaves squeue (finished, then MinJobAge passed): UNKNOWN, never "dead"/FAILED
    fake.set(squeue_gone=["300"])
    clock.t += 3
    snap = p.query(["300", "301"])
    assert snap.jobs["300"].state == "UNKNOWN" and snap.jobs["301"].state == "PENDING"
    assert fake.calls("sacct") == 1, "sacct is not retried on every read while accounting is off"
    assert fake.calls("squeue") == 2


def test_sacct_lag_falls_back_to_one_squeue_for_the_missing_ids(fake, tmp_path):
    fake.set(jobs={"400": {"state": "RUNNING"}, "401": {"state": "PENDING"}}, sacct_lag=["401"])
    p = _poller(tmp_path, Clock())
    snap = p.query(["400", "401"])
    assert snap.jobs["401"].state == "PENDING" and snap.source == "sacct+squeue"
    assert fake.calls("sacct") == 1 and fake.calls("squeue") == 1


def test_pending_array_expands_to_its_tasks(fake, tmp_path):
    fake.set(jobs={"500": {"state": "PENDING", "array": 500}})
    p = _poller(tmp_path, Clock())
    snap = p.query([f"500_{i}" for i in range(500)])
    assert len(snap.jobs) == 500 and {j.state for j in snap.jobs.values()} == {"PENDING"}


def test_running_elapsed_is_extrapolated_from_the_cached_answer(fake, tmp_path):
    fake.set(jobs={"600": {"state": "RUNNING"}})
    clock = Clock()
    p = _poller(tmp_path, clock)
    assert p.query(["600"]).jobs["600"].elapsed == "00:01:00"
    clock.t += 1
    assert p.query(["600"]).jobs["600"].elapsed == "00:01:01"
    assert fake.calls() == 1


def _reader(home: Path, ids, out: Path):
    code = textwrap.dedent(f"""
        import json, sys
        from hpc_jobs import poller
        snap = poller.query({list(ids)!r})
        json.dump({{k: v.state for k, v in snap.jobs.items()}}, open({str(out)!r}, "w"))
    """)
    env = dict(os.environ, HPC_JOBS_HOME=str(home))
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[2])


def test_two_processes_share_one_call(fake, tmp_path):
    """Two processes read at the same moment (the scheduler answers slowly): one call, one answer,
    written atomically to the user's cache; a third process a moment later makes no call."""
    fake.set(jobs={"700": {"state": "RUNNING", "array": 50}}, sleep=0.8)
    home = tmp_path / "home"
    ids = [f"700_{i}" for i in range(50)]
    procs = [_reader(home, ids, tmp_path / f"out{k}.json") for k in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    third = _reader(home, ids, tmp_path / "out2.json")
    assert third.wait(timeout=60) == 0
    answers = [json.loads((tmp_path / f"out{k}.json").read_text()) for k in range(3)]
    assert all(a == answers[0] for a in answers) and len(answers[0]) == 50
    assert fake.calls() == 1, fake.calls()
    cache = list((home / "cache").glob("scheduler-*.json"))
    assert len(cache) == 1 and oct(cache[0].stat().st_mode & 0o777) == "0o600"
    assert not list((home / "cache").glob(".*.tmp"))  # no temp file left behind


def test_a_corrupt_cache_is_rebuilt(fake, tmp_path):
    fake.set(jobs={"800": {"state": "RUNNING"}})
    path = tmp_path / "home" / "cache" / "sched.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "jobs": {"8')  # half-written by something else
    p = Poller(path, PollerConfig(), clock=Clock())
    assert p.query(["800"]).jobs["800"].state == "RUNNING"
    assert json.loads(path.read_text())["version"] == 1


def test_module_level_invalidate_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path / "ro"))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "cache").write_text("not a directory")
    pollmod.invalidate()  # must not break a launch


def test_a_node_fail_job_that_slurm_requeued_reads_pending(fake, tmp_path):
    """sacct keeps the NODE_FAIL record while the requeued job waits; squeue says PENDING: trust it
    (a resume would otherwise submit the job a second time). One extra squeue, only then."""
    fake.set(jobs={"900": {"state": "NODE_FAIL"}, "901": {"state": "RUNNING"}}, squeue_state={"900": "PENDING"})
    clock = Clock()
    p = _poller(tmp_path, clock)
    snap = p.query(["900", "901"])
    assert snap.jobs["900"].state == "PENDING" and snap.jobs["901"].state == "RUNNING"
    assert fake.calls("sacct") == 1 and fake.calls("squeue") == 1
    # really failed (squeue no longer lists it): NODE_FAIL, and it settles
    fake.set(squeue_gone=["900"])
    clock.t += 5
    assert p.query(["900", "901"]).jobs["900"].state == "NODE_FAIL"


def test_quiet_reads_ask_once_per_quiet_interval_but_new_ids_and_invalidate_still_at_once(tmp_path):
    """A caller that sees every change in the jobs' own files reads quiet: one call per 600 s for
    an hour of reads every second (7 in all), with the same answers as a loud read."""
    clock = Clock()
    calls = []

    def scheduler(ids, use_sacct):
        calls.append(clock.t - 1_000_000.0)
        return {j: JobInfo(j, "PENDING", "PENDING") for j in ids}, "sacct", True, 1

    p = Poller(tmp_path / "c.json", PollerConfig(), clock=clock, scheduler=scheduler)
    for t in range(0, 3600):
        clock.t = 1_000_000.0 + t
        snap = p.query(["7"], quiet=True)
    assert calls == [0, 600, 1200, 1800, 2400, 3000] and snap.get("7").state == "PENDING"
    clock.t = 1_000_000.0 + 3601
    p.query(["7", "8"], quiet=True)  # a new id: asked at the next min interval
    assert calls[-1] == 3601
    clock.t = 1_000_000.0 + 3610
    p.invalidate()  # a submission, cancel or resume
    p.query(["7", "8"], quiet=True)
    assert calls[-1] == 3610
    clock.t = 1_000_000.0 + 3615
    p.query(["7", "8"])  # a loud reader (a job not reporting itself) refreshes for everyone
    assert calls[-1] == 3615
    p.query(["7", "8"], quiet=True)
    assert len(calls) == 9
