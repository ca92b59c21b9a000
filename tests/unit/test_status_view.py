"""What ``status`` shows: progress from heartbeats (fresh, stale, missing, partial), the last
metric, the rich table (bar + ETA), failures with Slurm state, exit code, log tail and hint;
``--watch`` ending with the run; ``logs --attempt``; ``report``; ``debug`` on the local backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from hpc_jobs import cli
from hpc_jobs.ledger import Run
from hpc_jobs.record import JobRecord, StageRecord
from hpc_jobs.status import last_metric, log_attempts, parse_heartbeat, read_progress, stage_states
from tests.pipeline_helpers import REPO, cli as run_cli, launch_json
from tests.unit.test_poller import FakeSlurm

NOW = 1_800_000_000.0


# -- heartbeat parsing ---------------------------------------------------------------------------
def _hb(**fields) -> str:
    base = {"step": 250, "total_steps": 1000, "epoch": 0.5, "epochs": 2, "loss": 0.4321, "rate": 5.0,
            "samples_per_s": 40.0, "eta_s": 150.0, "time": NOW - 10, "host": "n1", "pid": 1, "phase": "train"}
    base.update(fields)
    return json.dumps(base)


def test_fresh_heartbeat():
    p = parse_heartbeat(_hb(), "RUNNING", now=NOW, stale_s=600)
    assert p["fraction"] == 0.25 and not p["stale"] and p["age_s"] == 10
    assert p["eta_s"] == 140  # written 10 s ago


def test_stale_heartbeat_only_while_running():
    old = _hb(time=NOW - 3600)
    assert parse_heartbeat(old, "RUNNING", now=NOW, stale_s=600)["stale"] is True
    assert parse_heartbeat(old, "COMPLETED", now=NOW, stale_s=600)["stale"] is False


def test_missing_partial_and_garbled_heartbeats_never_raise(tmp_path):
    assert read_progress(tmp_path, "RUNNING") is None  # no file
    assert parse_heartbeat(None) is None
    assert parse_heartbeat('{"step": 12, "total_st', "RUNNING")["unreadable"] is True  # half-written
    assert parse_heartbeat("[1, 2]", "RUNNING")["unreadable"] is True
    p = parse_heartbeat(json.dumps({"step": "x", "total_steps": None, "time": "yesterday"}), "RUNNING", now=NOW)
    assert p["fraction"] is None and p["eta_s"] is None and p["stale"] is False
    p = parse_heartbeat(json.dumps({"step": 5, "total_steps": 0}), "RUNNING", now=NOW)
    assert p["fraction"] is None
    # a data-prep heartbeat: step/total only, no ETA field: computed from the rate when there is one
    p = parse_heartbeat(json.dumps({"step": 10, "total_steps": 40, "rate": 2.0, "time": NOW, "phase": "extract"}),
                        "RUNNING", now=NOW)
    assert p["fraction"] == 0.25 and p["eta_s"] == 15
    # no rate either: the pace since the stage started (10 of 40 in 20 s -> 60 s to go)
    p = parse_heartbeat(json.dumps({"step": 10, "total_steps": 40, "time": NOW}), "RUNNING", now=NOW, started=NOW - 20)
    assert p["eta_s"] == 60


def test_last_metric_prefers_validation_rows(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,epoch,split,loss,spearman\n10,0.5,train,0.9,\n20,1.0,train,0.7,\n"
                                          "20,1.0,val,0.8,0.61\n30,1.5,train,0.5,\n")
    assert last_metric(tmp_path) == "val loss=0.8 spearman=0.61 @20"
    (tmp_path / "metrics.csv").write_text("step,epoch,split,loss\n10,0.5,train,0.9\n")
    assert last_metric(tmp_path) == "loss=0.9 @10"
    (tmp_path / "metrics.csv").unlink()
    assert last_metric(tmp_path, {"loss": 0.25}) == "loss=0.25"


# -- a run on disk -------------------------------------------------------------------------------
def _make_run(root: Path, backend: str = "local", name: str = "r1") -> Run:
    run = Run.create(root / "runs", "demo", name)
    stages = {}
    order = ["prep", "train", "evaluate"]
    for n, stage in enumerate(order):
        stages[stage] = {"name": stage, "where": "batch", "depends_on": order[n - 1:n], "array": None,
                         "state": "PLANNED", "jobs": [], "resources": {}, "inputs": {}, "outputs": {}}
        run.stage_dir(stage).mkdir(parents=True)
    run.stages = {name: StageRecord.from_dict(entry) for name, entry in stages.items()}
    run.record.update(backend=backend, cluster=backend, order=order, created="2026-01-01T00:00:00")
    run.save()
    return run


def _update(run: Run, stage: str, **fields) -> None:
    rec = run.stage(stage)
    for key, value in fields.items():
        if key == "jobs":
            rec.record_submission([JobRecord.from_dict(j) for j in value], time.time())
            rec.state = fields.get("state", rec.state)
            rec.history = fields.get("history", rec.history)
        elif key != "history" or "jobs" not in fields:
            setattr(rec, key, value)


def _marker(run: Run, stage: str, **fields) -> None:
    (run.stage_dir(stage) / "state.json").write_text(json.dumps(fields))


def test_table_shows_bar_eta_and_metric(tmp_path):
    run = _make_run(tmp_path)
    _update(run, "prep", state="COMPLETED", started=NOW - 100, ended=NOW - 90, exit_code=0)
    _update(run, "train", state="RUNNING", started=NOW - 60)
    run.save()
    _marker(run, "prep", state="COMPLETED", result={"frames": 10}, host="n1")
    (run.stage_dir("train") / "heartbeat.json").write_text(_hb(time=time.time() - 2))
    states = stage_states(run)
    assert states["train"].progress["fraction"] == 0.25
    text = cli.status_text(run, states)
    row = next(line for line in text.splitlines() if line.strip().startswith("train"))
    assert "RUNNING" in row and "25%" in row and "250/1000" in row and "ETA 0:02:" in row
    assert "█" in row or "#" in row
    assert "loss=0.4321" in row
    assert "frames=10" in text


def test_table_lists_interruptions_and_handoffs(tmp_path):
    """The attempt log (written by the runtime) reaches the table: each attempt that did not
    complete with its cause and step, oldest first; a completed attempt is not an interruption."""
    run = _make_run(tmp_path)
    _update(run, "train", state="RUNNING", started=NOW)
    run.stage("evaluate").inputs = {
        "weights": {"stage": "train", "output": "checkpoint", "kind": "init", "per_task": False},
        "data": {"stage": "prep", "output": "frames", "kind": "data", "per_task": False}}
    run.save()
    lines = [
        {"event": "start", "job_id": "7", "attempt": 0, "time": NOW},
        {"event": "end", "job_id": "7", "attempt": 0, "state": "REQUEUED", "cause": "TIMEOUT", "step": 34, "time": NOW + 1},
        {"event": "start", "job_id": "7", "attempt": 1, "time": NOW + 2},
        {"event": "end", "job_id": "7", "attempt": 1, "state": "REQUEUED", "cause": "PREEMPTED", "step": 74, "time": NOW + 3},
        {"event": "start", "job_id": "7", "attempt": 2, "time": NOW + 4},
    ]
    (run.stage_dir("train") / "attempts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    states = stage_states(run)
    assert [i["cause"] for i in states["train"].interruptions] == ["TIMEOUT", "PREEMPTED"]
    row = next(l for l in cli.status_text(run, states).splitlines() if l.strip().startswith("train"))
    assert "interrupted 2x: TIMEOUT@step 34, PREEMPTED@step 74" in row
    assert states["prep"].interruptions == []
    # the checkpoint handoffs are named (data inputs are not)
    assert states["evaluate"].handoff == "init train" and states["train"].handoff == ""
    row = next(l for l in cli.status_text(run, states).splitlines() if l.strip().startswith("evaluate"))
    assert "[init train]" in row


def test_table_flags_a_stale_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_JOBS_STALE_MIN", "5")
    run = _make_run(tmp_path)
    _update(run, "train", state="RUNNING", started=NOW)
    run.save()
    (run.stage_dir("train") / "heartbeat.json").write_text(_hb(time=time.time() - 1800))
    states = stage_states(run)
    assert states["train"].progress["stale"]
    row = next(l for l in cli.status_text(run, states).splitlines() if l.strip().startswith("train"))
    assert "STALE" in row and "ETA" not in row


def test_failed_local_stage_shows_exit_code_log_tail_and_hint(tmp_path):
    run = _make_run(tmp_path)
    _update(run, "prep", state="COMPLETED", exit_code=0)
    _update(run, "train", state="FAILED", exit_code=1)
    _update(run, "evaluate", state="CANCELLED", reason="upstream stage train did not complete")
    run.save()
    log = run.stage_dir("train") / "local" / "rank0.log"
    log.parent.mkdir()
    log.write_text("step 1\nTraceback (most recent call last):\n  File \"x.py\", line 3\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    _marker(run, "train", state="FAILED", error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    states = stage_states(run)
    assert states["train"].hint["cause"] == "cuda_oom"
    assert states["evaluate"].hint["cause"] == "dependency" and "'train'" in states["evaluate"].hint["hint"]
    text = cli.status_text(run, states)
    assert "hint: GPU out of memory" in text and "CUDA out of memory. Tried to allocate" in text
    assert "exit code 1" in text


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    f = FakeSlurm(tmp_path / "fake")
    for tool in ("sbatch",):  # slurm.available() looks for sbatch
        (f.bin / tool).write_text("#!/bin/sh\nexit 0\n")
        (f.bin / tool).chmod(0o755)
    for key, value in f.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path / "home"))
    return f


def test_slurm_failure_shows_the_slurm_state_and_one_query_for_the_run(tmp_path, fake_slurm):
    fake_slurm.set(jobs={"11": {"state": "COMPLETED"}, "12": {"state": "OUT_OF_MEMORY", "exit": "0:125"},
                         "13": {"state": "CANCELLED"}})
    run = _make_run(tmp_path, backend="slurm")
    for stage, jid in (("prep", "11"), ("train", "12"), ("evaluate", "13")):
        _update(run, stage, state="SUBMITTED", jobs=[{"job_id": jid}])
    run.save()
    err = run.stage_dir("train") / "slurm" / "12_0_log.err"
    err.parent.mkdir()
    err.write_text("submitit INFO - Starting with JobEnvironment(job_id=12)\n"
                   "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=12.0.\n")
    states = stage_states(run)
    assert fake_slurm.calls() == 1
    assert states["train"].state == "OUT_OF_MEMORY" and states["train"].exit_code == "0:125"
    assert states["train"].hint["cause"] == "host_oom"
    assert states["evaluate"].hint["cause"] == "dependency"
    text = cli.status_text(run, states)
    assert "OUT_OF_MEMORY" in text and "exit code 0:125" in text and "--mem" in text and "oom-kill" in text
    stage_states(run)
    assert fake_slurm.calls() == 1, "a second read within the interval is served from the cache"


def test_a_jobs_own_reports_show_at_once_without_asking_the_scheduler(tmp_path, fake_slurm, monkeypatch):
    """Its start: the job writes it into its marker; status shows it from there, and while every
    job reports itself the scheduler is asked only every HPC_JOBS_POLL_QUIET_S (600 s). Its end
    makes the next read ask at once (Slurm's end, exit code and the dependents follow it)."""
    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_MAX_S", "0.2")
    fake_slurm.set(jobs={"21": {"state": "PENDING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "prep", state="SUBMITTED", jobs=[{"job_id": "21"}])
    run.save()
    assert stage_states(run)["prep"].state == "PENDING"
    assert fake_slurm.calls() == 1
    time.sleep(0.3)
    assert stage_states(run)["prep"].state == "PENDING"
    assert fake_slurm.calls() == 1, "a pending job reports its own start: no call within the quiet interval"
    fake_slurm.set(jobs={"21": {"state": "RUNNING"}})
    started = datetime.fromtimestamp(time.time() - 5, timezone.utc).isoformat()  # within its 1 h limit
    _marker(run, "prep", state="RUNNING", job_id="21", host="n2", started=started)
    st = stage_states(run)["prep"]
    assert (st.state, st.node, st.raw_state) == ("RUNNING", "n2", "RUNNING (marker)") and st.elapsed
    assert fake_slurm.calls() == 1
    time.sleep(0.3)
    fake_slurm.set(jobs={"21": {"state": "COMPLETED"}})
    _marker(run, "prep", state="COMPLETED", job_id="21", result={"x": 1}, elapsed_s=3.0)
    st = stage_states(run)["prep"]
    assert st.state == "COMPLETED" and st.result == {"x": 1} and st.raw_state == "COMPLETED"
    assert fake_slurm.calls() == 2, "its end: asked at once (urgent)"
    _marker(run, "prep", state="RUNNING", job_id="20")  # an earlier job's marker says nothing about 21
    assert stage_states(run)["prep"].state == "COMPLETED"


def test_an_end_the_scheduler_has_not_seen_yet_shows_the_scheduler_until_it_has(tmp_path, fake_slurm, monkeypatch):
    """The stage wrote COMPLETED; Slurm still runs the job (its other ranks, the epilogue): status
    says RUNNING until Slurm agrees, so nothing reads "done" before its dependents can start."""
    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_MAX_S", "0.2")
    fake_slurm.set(jobs={"24": {"state": "RUNNING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "prep", state="SUBMITTED", jobs=[{"job_id": "24"}])
    run.save()
    _marker(run, "prep", state="RUNNING", job_id="24")
    stage_states(run)
    time.sleep(0.3)
    _marker(run, "prep", state="COMPLETED", job_id="24")
    assert stage_states(run)["prep"].state == "RUNNING"  # asked at once: Slurm still runs it
    assert fake_slurm.calls() == 2
    time.sleep(0.3)
    fake_slurm.set(jobs={"24": {"state": "COMPLETED"}})
    assert stage_states(run)["prep"].state == "COMPLETED"  # loud until then: the normal interval
    assert fake_slurm.calls() == 3


def test_a_running_job_that_went_silent_is_asked_about_not_trusted_for_600_s(tmp_path, fake_slurm, monkeypatch):
    """Rank 0 touches ``alive`` every 30 s; a job killed from outside (its time limit with the
    signal ignored, memory, scancel, its node) stops, and after 90 s the scheduler is asked."""
    import os

    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_MAX_S", "0.2")
    fake_slurm.set(jobs={"23": {"state": "RUNNING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "prep", state="SUBMITTED", jobs=[{"job_id": "23"}])
    run.save()
    _marker(run, "prep", state="RUNNING", job_id="23", host="n1")
    alive = run.stage_dir("prep") / "alive"
    alive.touch()
    assert stage_states(run)["prep"].state == "RUNNING"
    calls = fake_slurm.calls()
    time.sleep(0.3)
    stage_states(run)
    assert fake_slurm.calls() == calls, "alive and reporting: quiet"
    fake_slurm.set(jobs={"23": {"state": "TIMEOUT"}})
    old = time.time() - 100
    os.utime(alive, (old, old))  # silent for 100 s
    time.sleep(0.3)
    st = stage_states(run)["prep"]
    assert fake_slurm.calls() == calls + 1 and st.state == "TIMEOUT", (fake_slurm.calls(), st.state)


def test_a_running_job_past_its_time_limit_is_asked_about_while_still_alive(tmp_path, fake_slurm, monkeypatch):
    """Slurm kills a job at its limit KillWait seconds after SIGTERM, often before it can write its
    end; its ``alive`` file is still fresh then. Past the limit the scheduler is asked at the normal
    interval, so TIMEOUT shows in seconds, not after the 90 s of silence."""
    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_MAX_S", "0.2")
    fake_slurm.set(jobs={"25": {"state": "RUNNING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "prep", state="SUBMITTED", jobs=[{"job_id": "25"}], resources={"time": "00:01:00"})
    run.save()
    started = datetime.fromtimestamp(time.time() - 50, timezone.utc).isoformat()
    _marker(run, "prep", state="RUNNING", job_id="25", host="n1", started=started)
    (run.stage_dir("prep") / "alive").touch()
    assert stage_states(run)["prep"].state == "RUNNING"
    calls = fake_slurm.calls()
    time.sleep(0.3)
    stage_states(run)
    assert fake_slurm.calls() == calls, "50 s into a 1-minute limit, alive and reporting: quiet"
    fake_slurm.set(jobs={"25": {"state": "TIMEOUT"}})
    started = datetime.fromtimestamp(time.time() - 70, timezone.utc).isoformat()
    _marker(run, "prep", state="RUNNING", job_id="25", host="n1", started=started)
    os.utime(run.stage_dir("prep") / "state.json", (time.time() - 70,) * 2)  # written at its start
    (run.stage_dir("prep") / "alive").touch()
    time.sleep(0.3)
    st = stage_states(run)["prep"]
    assert fake_slurm.calls() == calls + 1 and st.state == "TIMEOUT", (fake_slurm.calls(), st.state)


def test_a_running_job_that_has_not_reported_itself_is_asked_at_the_normal_interval(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_MAX_S", "0.2")
    fake_slurm.set(jobs={"22": {"state": "RUNNING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "prep", state="SUBMITTED", jobs=[{"job_id": "22"}])
    run.save()
    assert stage_states(run)["prep"].state == "RUNNING"
    time.sleep(0.3)
    stage_states(run)
    assert fake_slurm.calls() == 2, "running without a marker (starting, or silent): asked again"
    _marker(run, "prep", state="RUNNING", job_id="22")
    time.sleep(0.3)
    stage_states(run)
    assert fake_slurm.calls() == 2, "it reported itself: quiet again"


def test_a_reported_failure_asks_the_scheduler_soon_for_what_slurm_does_to_the_dependents(tmp_path, fake_slurm,
                                                                                           monkeypatch):
    """train fails (its marker); Slurm cancels evaluate (kill-on-invalid-dep), which nobody reports:
    the failure makes the next read loud, so the cancellation shows within the normal interval."""
    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_MAX_S", "0.2")
    fake_slurm.set(jobs={"31": {"state": "RUNNING"}, "32": {"state": "PENDING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "train", state="SUBMITTED", jobs=[{"job_id": "31"}])
    _update(run, "evaluate", state="SUBMITTED", jobs=[{"job_id": "32"}])
    run.save()
    _marker(run, "train", state="RUNNING", job_id="31")
    stage_states(run)
    time.sleep(0.3)
    _marker(run, "train", state="FAILED", job_id="31", error="boom")
    fake_slurm.set(jobs={"31": {"state": "FAILED", "exit": "1:0"}, "32": {"state": "CANCELLED"}})
    states = stage_states(run)
    assert states["evaluate"].state == "CANCELLED" and states["train"].state == "FAILED"
    assert states["train"].exit_code == "1:0"  # the scheduler's own record, asked at once
    assert fake_slurm.calls() == 2


def test_a_queued_job_below_a_failed_stage_is_asked_about_until_slurm_cancels_it(tmp_path, fake_slurm, monkeypatch):
    """Slurm cancels a dependent a scheduling cycle after its parent failed: the answer that saw
    the failure may still have it PENDING; status keeps asking at the normal interval."""
    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_MAX_S", "0.2")
    fake_slurm.set(jobs={"41": {"state": "FAILED", "exit": "1:0"}, "42": {"state": "PENDING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "train", state="SUBMITTED", jobs=[{"job_id": "41"}])
    _update(run, "evaluate", state="SUBMITTED", jobs=[{"job_id": "42"}])
    run.save()
    assert stage_states(run)["evaluate"].state == "PENDING"
    time.sleep(0.3)
    fake_slurm.set(jobs={"41": {"state": "FAILED", "exit": "1:0"}, "42": {"state": "CANCELLED"}})
    assert stage_states(run)["evaluate"].state == "CANCELLED"
    assert fake_slurm.calls() == 2
    time.sleep(0.3)
    stage_states(run)
    assert fake_slurm.calls() == 2, "nothing queued below the failure any more: quiet"


def test_a_change_from_outside_shows_after_the_quiet_interval(tmp_path, fake_slurm, monkeypatch):
    """An admin's scancel of a pending job: only the scheduler knows; asked after HPC_JOBS_POLL_QUIET_S."""
    monkeypatch.setenv("HPC_JOBS_POLL_MIN_S", "0.2")
    monkeypatch.setenv("HPC_JOBS_POLL_QUIET_S", "1")
    fake_slurm.set(jobs={"23": {"state": "PENDING"}})
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "prep", state="SUBMITTED", jobs=[{"job_id": "23"}])
    run.save()
    assert stage_states(run)["prep"].state == "PENDING"
    fake_slurm.set(jobs={"23": {"state": "CANCELLED"}})
    assert stage_states(run)["prep"].state == "PENDING"
    time.sleep(1.2)
    assert stage_states(run)["prep"].state == "CANCELLED"
    assert fake_slurm.calls() == 2
    assert stage_states(run, fresh=True)["prep"].state == "CANCELLED"  # resume's read: urgent, as before


def test_log_attempts_split_a_requeued_jobs_file(tmp_path, monkeypatch):
    run = _make_run(tmp_path, backend="slurm")
    _update(run, "train", jobs=[{"job_id": "31"}], history=[{"job_ids": ["30"]}, {"job_ids": ["31"]}])
    run.save()
    folder = run.stage_dir("train") / "slurm"
    folder.mkdir()
    (folder / "30_0_log.err").write_text("submitit INFO - Starting with JobEnvironment(job_id=30)\nboom\n")
    (folder / "30_0_log.out").write_text("first\n")
    (folder / "31_0_log.err").write_text("submitit INFO - Starting with JobEnvironment(job_id=31)\nsignal USR2\n"
                                         "submitit INFO - Starting with JobEnvironment(job_id=31)\ndone\n")
    (folder / "31_0_log.out").write_text("[hpc_jobs] attempt 1\nA\n[hpc_jobs] attempt 2\nB\n")
    attempts = log_attempts(run, "train")
    assert [(a.job_id, a.how) for a in attempts] == [("30", "submitted"), ("31", "resubmitted (resume)"),
                                                     ("31", "requeued")]
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path))
    out = _capture(["logs", str(run.dir), "train", "--attempt", "3"])
    assert "done" in out and "B" in out and "signal USR2" not in out and "\nA\n" not in out
    out = _capture(["logs", str(run.dir), "train", "--attempt", "1"])
    assert "boom" in out and "first" in out
    out = _capture(["logs", str(run.dir), "train"])
    assert "3 attempts" in out and "signal USR2" in out and "done" in out
    # submitit's start lines in the .out file only (its logger writes to stdout there)
    _update(run, "evaluate", jobs=[{"job_id": "40"}], history=[{"job_ids": ["40"]}])
    run.save()
    folder = run.stage_dir("evaluate") / "slurm"
    folder.mkdir()
    (folder / "40_0_log.out").write_text("setup line\nsubmitit INFO - Starting with JobEnvironment(job_id=40)\none\n"
                                         "submitit INFO - Starting with JobEnvironment(job_id=40)\ntwo\n")
    (folder / "40_0_log.err").write_text("Traceback: preempted\n")
    attempts = log_attempts(run, "evaluate")
    assert [a.how for a in attempts] == ["submitted", "requeued"]
    first = _capture(["logs", str(run.dir), "evaluate", "--attempt", "1"])
    assert "setup line" in first and "one" in first and "two" not in first
    assert "two" in _capture(["logs", str(run.dir), "evaluate", "--attempt", "-1"])


def _capture(argv) -> str:
    proc = subprocess.run([sys.executable, "launch.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_watch_returns_when_the_run_ends(tmp_path, capsys):
    run = _make_run(tmp_path)
    for stage in ("prep", "train"):
        _update(run, stage, state="COMPLETED", exit_code=0)
    _update(run, "evaluate", state="RUNNING", started=time.time())
    run.save()

    def finish():
        time.sleep(1.0)
        r = Run(run.dir)
        _update(r, "evaluate", state="COMPLETED", ended=time.time(), exit_code=0)
        r.save()

    threading.Thread(target=finish, daemon=True).start()
    start = time.monotonic()
    code = cli.watch(Run(run.dir), interval=0.2, max_s=30)
    assert code == 0 and time.monotonic() - start < 10
    out = capsys.readouterr().out
    assert "RUNNING" in out and out.count("-- ") >= 2  # the first view and the final one


def test_watch_exit_code_is_1_when_a_stage_failed(tmp_path):
    run = _make_run(tmp_path)
    _update(run, "prep", state="FAILED", exit_code=1)
    for stage in ("train", "evaluate"):
        _update(run, stage, state="CANCELLED")
    run.save()
    assert cli.watch(Run(run.dir), interval=0.1, max_s=10) == 1


def test_report_links_losses_png_and_lists_final_metrics(tmp_path, monkeypatch):
    run = _make_run(tmp_path)
    for stage in ("prep", "train", "evaluate"):
        _update(run, stage, state="COMPLETED", exit_code=0, started=NOW, ended=NOW + 5)
    run.save()
    (run.stage_dir("train") / "losses.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run.stage_dir("train") / "tb").mkdir()
    _marker(run, "train", state="COMPLETED", started="2026-01-01T00:00:00+00:00", ended="2026-01-01T00:01:40+00:00",
            result={"best": {"spearman": 0.93}, "steps": 100})
    (run.stage_dir("evaluate") / "metrics.json").write_text(json.dumps({"spearman": 0.91, "l2": 12.5}))
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path))
    out = _capture(["report", str(run.dir)])
    path = Path(out.strip())
    assert path == run.dir / "report.md"
    text = path.read_text()
    assert "](stages/train/losses.png)" in text
    assert "| best.spearman | 0.93 |" in text and "metrics.json: spearman" in text
    assert "| train | COMPLETED |" in text and "0:01:40" in text
    assert "tensorboard --logdir stages/train/tb" in text
    html = _capture(["report", str(run.dir), "--format", "html"])
    page = Path(html.strip()).read_text()  # self-contained: the picture is embedded, not linked
    assert "src='data:image/png;base64,iVBORw0KGgo=" in page and "stages/train/losses.png" not in page


# -- the commands on the local backend (the demo runs in seconds) --------------------------------
@pytest.fixture(scope="module")
def local_demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("mon")
    out = launch_json(home, "demo", "--cluster", "local", "--run-name", "src", "--set", "epochs=5",
                      "--set", "more_epochs=5")
    assert not out["failed"]
    return home


def test_status_json_keeps_its_keys_and_adds_the_new_ones(local_demo):
    data = json.loads(run_cli(local_demo, "status", "src", "--json").stdout)
    assert data["finished"] is True
    for s in data["stages"]:
        for key in ("name", "state", "job_ids", "elapsed", "exit_code", "result", "error", "tasks", "progress",
                    "node", "metric", "hint", "log_tail"):
            assert key in s, key
    watch = run_cli(local_demo, "status", "src", "--watch", "--interval", "0.2", timeout=60)
    assert "COMPLETED" in watch.stdout


def test_debug_locally_without_a_terminal_runs_the_stage_and_records_a_debug_run(local_demo):
    proc = run_cli(local_demo, "debug", "demo", "--stage", "train", "--cluster", "local", "--from-run", "src",
                   "--set", "epochs=3", "--run-name", "dbg1", check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "config differs" in proc.stdout and "epochs" in proc.stdout
    data = json.loads(run_cli(local_demo, "status", "dbg1", "--json").stdout)
    assert data["debug"] is True
    st = {s["name"]: s for s in data["stages"]}
    assert st["train"]["state"] == "COMPLETED" and st["train"]["result"]["step"] == 3
    assert st["shard"]["state"] == "COMPLETED" and st["evaluate"]["state"] == "SKIPPED"
    run_dir = Path(data["run_dir"])
    assert (run_dir / "stages" / "shard").is_symlink()
    assert json.loads((run_dir / "run.json").read_text())["debug"] is True


def test_debug_without_from_run_takes_the_newest_run_whose_inputs_completed(local_demo, tmp_path):
    proc = run_cli(local_demo, "debug", "demo", "--stage", "train", "--cluster", "local", "--run-name", "dbg-auto",
                   check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the inputs of stage train come from run src" in proc.stdout
    data = json.loads(run_cli(local_demo, "status", "dbg-auto", "--json").stdout)
    assert {s["name"]: s["state"] for s in data["stages"]}["train"] == "COMPLETED"
    # no earlier run at all: one line that says what to do
    proc = run_cli(tmp_path, "debug", "demo", "--stage", "train", "--cluster", "local", check=False)
    assert proc.returncode == 2 and "no earlier run of 'demo' completed them" in proc.stderr and "--from-run" in proc.stderr
    proc = run_cli(local_demo, "debug", "demo", "--stage", "nope", "--cluster", "local", check=False)
    assert proc.returncode == 2 and "no stage 'nope'" in proc.stderr


def test_debug_break_stops_in_pdb_through_a_pty(local_demo):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, HPC_JOBS_HOME=str(local_demo), PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["launch.py", "debug", "demo", "--stage", "train", "--cluster", "local",
                                           "--from-run", "src", "--break", "--run-name", "dbg2"],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=90)
    try:
        child.expect(r"\(Pdb\)")
        child.sendline("p ctx.stage")
        child.expect("'train'")
        child.sendline("c")
        child.expect("stage train completed")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_status_fits_80_columns_without_breaking_a_word(tmp_path):
    run = _make_run(tmp_path)
    _update(run, "prep", state="COMPLETED", started=NOW - 100, ended=NOW - 90, exit_code=0)
    _update(run, "train", state="RUNNING", started=NOW - 60)
    run.save()
    _marker(run, "prep", state="COMPLETED", host="n1",
            result={"frames": 10, "clips": 1234, "note": "a long result that will not fit in the narrow table at all"})
    (run.stage_dir("train") / "heartbeat.json").write_text(_hb(time=time.time() - 2))
    states = stage_states(run)
    wide = cli.status_text(run, states, width=160)
    assert "node" in wide and ("█" in wide or "#" in wide)
    narrow = cli.status_text(run, states, width=80)
    lines = narrow.splitlines()
    assert max(len(line) for line in lines) <= 80, narrow
    assert "node" not in lines[2]  # the node column goes first
    rows = {line.split()[0]: line for line in lines if line.strip() and line.split()[0] in ("prep", "train", "evaluate")}
    assert rows["train"].split()[1] == "RUNNING" and "25% ETA" in rows["train"]
    assert rows["prep"].split()[1] == "COMPLETED" and rows["prep"].rstrip().endswith("…")
    for word in rows["prep"].split()[3:-1]:  # every note word shown whole (the last one ends in the ellipsis)
        assert word in wide, word
