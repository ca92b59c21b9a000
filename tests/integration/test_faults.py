"""Fault injection on the real dev cluster: what each fault costs, in steps and in seconds.

Every test runs the test-only ``faultlab`` workflow (tests/workflows/faultlab.py: prepare -> train
through the engine, 120 steps, a checkpoint every 10 -> evaluate, which inits from train's final
checkpoint), injects one fault, and asserts what was lost: at most the steps since the last
complete checkpoint, and no completed output. Where a run ends with the same world size as the
uninterrupted reference (the same stage run by the local backend), its final checkpoint must be
bit-identical to the reference: weights, optimizer, RNG streams, step, and the metrics log.

Each test records a row (fault, steps lost, seconds to recover) in ``FIGURES``; the module prints
the table at the end and writes it to ``/tmp/hpc_jobs_it/fault-figures.json`` (docs/reliability.md
quotes it). "Recover" is measured from the fault to the first training step of the next attempt.

The cluster is shared with other suites: the tests that stop a daemon keep the outage to seconds
and always bring it back in a ``finally`` with ``DevCluster().up()`` (idempotent; it also resumes
a node left DOWN); preemption is aimed at the GPUs of the one node the victim runs on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from tests.pipeline_helpers import REPO, cli, launch_json, states_of, status_json, wait_run

from .conftest import JOBS_ROOT, sacct, wait_for

STEPS = 120  # faultlab defaults: 192 samples / batch 8 = 24 steps per epoch x 5 epochs
EVERY = 10  # checkpoint_every
FIGURES: List[Dict[str, Any]] = []
LAUNCHERS = "tests.workflows"


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _faultlab_env():
    """Make the test-only workflow package visible to every launch.py this module runs."""
    # HPC_JOBS_POLL_MAX_S: the shared status cache asks the scheduler at least every 2 s here, so
    # the tests see a state change within seconds (users get a gentler backoff)
    settings = {"HPC_JOBS_LAUNCHERS": LAUNCHERS, "HPC_JOBS_POLL_MAX_S": "2"}
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _report()


@pytest.fixture(scope="module")
def home() -> Path:
    path = JOBS_ROOT / f"faults-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


class Reference:
    """The uninterrupted train stage, run by the local backend in the background."""

    def __init__(self, home: Path):
        self.home = home
        env = dict(os.environ, HPC_JOBS_HOME=str(home), HPC_JOBS_LAUNCHERS=LAUNCHERS)
        self.proc = subprocess.Popen(
            [sys.executable, "launch.py", "faultlab", "--cluster", "local", "--run-name", "ref",
             "--set", "downstream=false", "--json"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._dir: Optional[Path] = None

    @property
    def train_dir(self) -> Path:
        if self._dir is None:
            out, err = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, f"reference run failed:\n{out}\n{err[-3000:]}"
            self._dir = Path(json.loads(out)["run_dir"]) / "stages" / "train"
        return self._dir


@pytest.fixture(scope="module")
def reference(home) -> Reference:
    return Reference(home / "local")


@pytest.fixture(scope="module")
def time_limit_run(home, slurm_cluster) -> Dict[str, Any]:
    """Launched first (it needs a minute of wall time) and checked by the last test. 120 steps of
    0.6 s outlast the 1-minute limit, so the warning always comes before the work is done (with
    0.3 s a late limit check once let the whole run finish unsignalled)."""
    started = time.time()
    out = launch_json(home, "faultlab", "--cluster", "devcluster", "--run-name", "timelimit",
                      "--time", "00:01:00", "--set", "step_sleep_s=0.6", "--set", "downstream=false")
    return {"run_dir": Path(out["run_dir"]), "launched": started}


# ----------------------------------------------------------------------------------------- helpers
def launch(home: Path, name: str, *args: str) -> Path:
    out = launch_json(home, "faultlab", "--cluster", "devcluster", "--run-name", name, *args)
    run_dir = Path(out["run_dir"])
    return run_dir


def assert_interrupted_by(home: Path, name: str, cause: str) -> None:
    """`status` tells this run's train interruptions apart: every one has the scenario's cause."""
    train = status_json(home, name)["train"]
    causes = [i["cause"] for i in train.get("interruptions", [])]
    assert causes and set(causes) == {cause}, (name, train.get("interruptions"))


def train_dir(run_dir: Path) -> Path:
    return run_dir / "stages" / "train"


def trail(run_dir: Path) -> List[Dict[str, Any]]:
    """faultlab's own record of the train stage: start/stop/done lines of rank 0."""
    path = train_dir(run_dir) / "trail.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def starts(run_dir: Path) -> List[Dict[str, Any]]:
    return [r for r in trail(run_dir) if r["event"] == "start"]


def heartbeat(run_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((train_dir(run_dir) / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return {}


def job_id(run_dir: Path, stage: str = "train") -> str:
    record = json.loads((run_dir / "run.json").read_text())
    return str(record["stages"][stage]["jobs"][0]["job_id"])


def squeue_state(jid: str) -> str:
    res = subprocess.run(["squeue", "-h", "-t", "all", "-j", jid, "-o", "%T"], capture_output=True, text=True,
                         timeout=60)
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""



def wait_training(run_dir: Path, at_least: int, attempt: int, timeout: float = 180) -> Dict[str, Any]:
    """Wait until attempt number ``attempt`` (0-based start line) trains at step >= ``at_least``;
    returns its heartbeat."""
    def ready():
        s = starts(run_dir)
        if len(s) <= attempt:
            return None
        beat = heartbeat(run_dir)
        if beat.get("pid") == s[attempt]["pid"] and beat.get("phase") == "train" and beat.get("step", -1) >= at_least:
            return beat
        return None

    return wait_for(ready, timeout, f"attempt {attempt} of {run_dir.name} to reach step {at_least}", poll=0.05)


def first_steps(run_dir: Path) -> List[float]:
    """When each attempt trained its first step (after start-up, data and resume)."""
    return [r["time"] for r in trail(run_dir) if r["event"] == "first_step"]


def first_step_time(run_dir: Path, attempt: int, timeout: float = 240) -> float:
    """Wait until attempt ``attempt`` trains; when it trained its first step."""
    wait_for(lambda: len(first_steps(run_dir)) > attempt, timeout, f"attempt {attempt} of {run_dir.name} to train")
    return first_steps(run_dir)[attempt]


def final_state(path: Path) -> Dict[str, Any]:
    from hpc_jobs.checkpoint import load_checkpoint

    return load_checkpoint(path / "checkpoints" / "last.pt")


def assert_same(a: Any, b: Any, where: str = "") -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


def assert_bit_identical(reference: Reference, run_dir: Path) -> None:
    """Same weights, optimizer state, RNG streams, position and metrics log as the uninterrupted run."""
    ref, got = final_state(reference.train_dir), final_state(train_dir(run_dir))
    for key in ("model", "optimizer", "scheduler", "rng", "step", "epoch", "batch_in_epoch", "log_accum"):
        assert_same(ref[key], got[key], key)
    assert got["step"] == STEPS
    assert (reference.train_dir / "metrics.csv").read_text() == (train_dir(run_dir) / "metrics.csv").read_text()


def lost_steps(run_dir: Path) -> List[int]:
    """For every interruption: steps trained before it that the next attempt had to redo."""
    rows = trail(run_dir)
    lost, reached = [], None
    for row in rows:
        if row["event"] in ("stop", "killed"):
            reached = row["step"]
        elif row["event"] == "start" and reached is not None:
            lost.append(reached - row["from_step"])
            reached = None
    return lost


def record(fault: str, lost: Any, recover_s: Any, **detail: Any) -> None:
    row = {"fault": fault, "lost_steps": lost, "recover_s": recover_s, **detail}
    FIGURES.append(row)
    print(f"\n[fault] {json.dumps(row)}")


def _report() -> None:
    if not FIGURES:
        return
    lines = ["", f"{'fault':<40} {'lost steps':<14} {'recover s':<12} detail"]
    for row in FIGURES:
        detail = {k: v for k, v in row.items() if k not in ("fault", "lost_steps", "recover_s")}
        lines.append(f"{row['fault']:<40} {str(row['lost_steps']):<14} {str(row['recover_s']):<12} {detail}")
    print("\n".join(lines))
    try:
        (JOBS_ROOT / "fault-figures.json").write_text(json.dumps(FIGURES, indent=1))
    except OSError:
        pass


def usr2(jid: str) -> float:
    """What Slurm sends before a time limit or a preemption, sent now: to the job's steps (the
    srun'd task processes), not the batch shell."""
    sent = time.time()
    res = subprocess.run(["scancel", "--signal=USR2", jid], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return sent


def sacct_history(jid: str) -> List[str]:
    """States of every run of a (requeued) job, oldest first."""
    return [r["State"] for r in sacct(jid, duplicates=True)]


def devcluster():
    from hpc_jobs.devcluster import DevCluster

    return DevCluster(echo=lambda msg: None)


def restore_cluster() -> float:
    """Bring every daemon back and every node to idle the way `python -m hpc_jobs.devcluster up`
    does; returns the seconds it took."""
    t = time.monotonic()
    devcluster().up()
    return time.monotonic() - t


# ------------------------------------------------------------------- 1. USR2: requeue, exact resume
def test_usr2_twice_checkpoints_requeues_and_ends_bit_identical(slurm_cluster, home, reference, time_limit_run):
    """The issue's "exact resume" on the cluster: USR2 mid-epoch twice; each time the engine writes
    a checkpoint at the next step boundary, requeues the job and the next start resumes there."""
    run_dir = launch(home, "usr2", "--set", "step_sleep_s=0.08", "--set", "downstream=false")
    jid = job_id(run_dir)
    recover = []
    for attempt, at in ((0, 33), (1, 73)):  # mid-epoch (24 steps per epoch), mid-interval (EVERY=10)
        wait_training(run_dir, at, attempt)
        sent = usr2(jid)
        recover.append(round(first_step_time(run_dir, attempt + 1) - sent, 1))
    states = wait_run(home, "usr2", timeout=240)
    assert states["train"]["state"] == "COMPLETED", states
    rows = trail(run_dir)
    stops = [r for r in rows if r["event"] == "stop"]
    assert [s["kind"] for s in stops] == ["Requeued", "Requeued"] and all(s["requeued"] for s in stops), rows
    assert [s["restart"] for s in starts(run_dir)] == [0, 1, 2]
    # each restart resumed from the checkpoint written on the signal: nothing trained twice
    assert [s["from_step"] for s in starts(run_dir)[1:]] == [s["step"] for s in stops]
    assert [s["checkpoint"] for s in stops] == [f"step-{s['step']:08d}.pt" for s in stops]
    assert all(s["step"] % EVERY for s in stops), "the signal must land between periodic checkpoints"
    assert lost_steps(run_dir) == [0, 0]
    assert sacct_history(jid) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    assert_bit_identical(reference, run_dir)
    # a job Slurm starts again (requeue, preemption) days later runs the code recorded with the run
    # (RUN/code), not whatever the checkout holds by then
    for start in starts(run_dir):
        assert Path(start["code"]).is_relative_to(run_dir / "code"), (
            f"attempt {start['restart']} imported {start['code']}, not the snapshot in {run_dir / 'code'}")
    assert_interrupted_by(home, "usr2", "REQUEUED")
    record("USR2 mid-training (x2)", lost_steps(run_dir), recover, stopped_at=[s["step"] for s in stops])


def test_requeue_limit_fails_the_stage_instead_of_looping(slurm_cluster, home):
    run_dir = launch(home, "limit", "--set", "step_sleep_s=0.08", "--set", "downstream=false",
                     "--set", "max_requeues=0")
    jid = job_id(run_dir)
    wait_training(run_dir, 5, 0)
    usr2(jid)
    states = wait_run(home, "limit", timeout=180)
    assert states["train"]["state"] == "FAILED", states
    assert "requeued 1 times (limit 0)" in states["train"]["error"], states["train"]
    assert sacct_history(jid) == ["REQUEUED", "FAILED"]
    assert len(starts(run_dir)) == 1  # the second start stopped before the stage function ran


# ------------------------------------------------------------------------------- 3. preemption
def test_preemption_by_the_high_partition_requeues_and_resumes(slurm_cluster, home, reference):
    run_dir = launch(home, "preempt", "--gpus", "1", "--set", "use_gpus=true", "--set", "step_sleep_s=0.08",
                     "--set", "downstream=false")
    jid = job_id(run_dir)
    wait_training(run_dir, 25, 0)
    node = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%N"], capture_output=True, text=True).stdout.strip()
    assert node in ("n1", "n2"), node
    # all the GPUs of the victim's node, in the partition that preempts `batch`
    name = f"fault-preemptor-{uuid.uuid4().hex[:6]}"
    sent = time.time()
    sub = subprocess.run(["sbatch", "--parsable", "-p", "high", "-w", node, "--gres=gpu:2", "-t", "1",
                          "-J", name, "-o", "/dev/null", "--wrap", "sleep 1"], capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    high = sub.stdout.strip().split(";")[0]
    try:
        recover = round(first_step_time(run_dir, 1) - sent, 1)
        states = wait_run(home, "preempt", timeout=240)
    finally:
        subprocess.run(["scancel", "-n", name], capture_output=True)
    assert states["train"]["state"] == "COMPLETED", states
    assert sacct(high)[0]["State"] == "COMPLETED"
    history = sacct_history(jid)
    assert history[-1] == "COMPLETED" and set(history[:-1]) <= {"PREEMPTED", "REQUEUED"} and history[:-1], history
    stops = [r for r in trail(run_dir) if r["event"] == "stop"]
    assert stops and stops[0]["kind"] == "Requeued", trail(run_dir)
    assert lost_steps(run_dir) == [0] * len(stops)
    assert_bit_identical(reference, run_dir)
    assert_interrupted_by(home, "preempt", "PREEMPTED")
    record("preemption (high partition)", lost_steps(run_dir), recover, slurm_history=history,
           stopped_at=stops[0]["step"])


# ------------------------------------ 4 + 7 + 10. SIGKILL: the stage fails, descendants cancelled,
# ------------------------------------------------ resume (twice at once) continues from the checkpoint
def test_sigkill_fails_the_stage_and_resume_continues_from_the_last_checkpoint(slurm_cluster, home, reference):
    run_dir = launch(home, "sigkill", "--set", "step_sleep_s=0.08")
    ids = {s: job_id(run_dir, s) for s in ("prepare", "train", "evaluate")}
    beat = wait_training(run_dir, 37, 0)  # 7 steps after the periodic checkpoint of step 30
    pid = beat["pid"]
    beat = heartbeat(run_dir)  # the freshest step before the kill
    os.kill(pid, signal.SIGKILL)
    killed_at, killed_step = time.time(), beat["step"]
    with open(train_dir(run_dir) / "trail.jsonl", "a") as fh:  # the killed process cannot say it
        fh.write(json.dumps({"event": "killed", "step": killed_step, "time": killed_at}) + "\n")

    states = wait_run(home, "sigkill", timeout=120)
    detected = time.time()
    # 7. the failed stage's descendant does not wait forever: Slurm cancelled it (kill_invalid_depend)
    assert states_of(states) == {"prepare": "COMPLETED", "train": "FAILED", "evaluate": "CANCELLED"}, states
    assert sacct(ids["evaluate"])[0]["State"] == "CANCELLED"
    # cancelled by Slurm even where slurm.conf lacks kill_invalid_depend: the job asks for it
    assert "#SBATCH --kill-on-invalid-dep=yes" in (run_dir / "stages" / "evaluate" / "job.sbatch").read_text()
    data = run_dir / "stages" / "prepare" / "data.json"
    data_mtime = data.stat().st_mtime_ns
    before = json.loads((run_dir / "run.json").read_text())
    from hpc_jobs.checkpoint import latest_complete, read_manifest

    last = read_manifest(latest_complete(train_dir(run_dir) / "checkpoints")).step
    assert killed_step - EVERY <= last <= killed_step, (last, killed_step)

    # 10. two resumes at once: exactly one submits, the other is refused and says why
    procs = [subprocess.Popen([sys.executable, "launch.py", "resume", "sigkill"], cwd=REPO,
                              env=dict(os.environ, HPC_JOBS_HOME=str(home)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 2], outs
    refused = next(err for code, _, err in outs if code == 2)
    # who holds the lock is named unless the two start within the same instant (see the unit test
    # test_a_lock_taken_an_instant_ago_names_its_holder)
    assert "run sigkill is locked (" in refused or "still queued or running" in refused, refused
    accepted = next(out for code, out, _ in outs if code == 0)
    assert "resuming train, evaluate; reusing completed prepare" in accepted, accepted
    after = json.loads((run_dir / "run.json").read_text())
    for stage in ("train", "evaluate"):
        assert len(after["stages"][stage]["history"]) == len(before["stages"][stage]["history"]) + 1, stage
    assert after["stages"]["prepare"]["jobs"] == before["stages"]["prepare"]["jobs"]  # not resubmitted

    recover = round(first_step_time(run_dir, 1) - killed_at, 1)
    states = wait_run(home, "sigkill", timeout=240)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    resumed = starts(run_dir)[1]
    assert resumed["from_step"] == last, (resumed, killed_step)
    lost = killed_step - resumed["from_step"]
    assert 0 <= lost <= EVERY
    assert data.stat().st_mtime_ns == data_mtime  # the completed upstream output was reused
    assert states["evaluate"]["result"]["step"] == STEPS
    assert_bit_identical(reference, run_dir)
    assert_interrupted_by(home, "sigkill", "FAILED")
    record("SIGKILL of the training process", lost, recover, killed_at_step=killed_step,
           resumed_from=resumed["from_step"], detect_s=round(detected - killed_at, 1))


# -------------------------------------------------------------- 5. SIGKILL during a checkpoint write
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(slurm_cluster, home, reference):
    run_dir = launch(home, "ckptkill", "--set", "step_sleep_s=0.05", "--set", "ballast_mb=96",
                     "--set", "downstream=false")
    ckpts = train_dir(run_dir) / "checkpoints"
    wait_training(run_dir, EVERY + 1, 0)  # step-10 is complete: kill while step-20 is written

    def writing():
        try:
            return [p for p in os.scandir(ckpts) if p.name.startswith(f"step-{2 * EVERY:08d}.pt.tmp-")]
        except FileNotFoundError:
            return []

    tmp = wait_for(writing, 120, "the write of checkpoint step 20", poll=0.002)[0]
    pid = int(tmp.name.rsplit("-", 1)[1])  # the writer names the temporary file after itself
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    with open(train_dir(run_dir) / "trail.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "killed", "step": 2 * EVERY, "time": killed_at}) + "\n")
    states = wait_run(home, "ckptkill", timeout=120)
    assert states["train"]["state"] == "FAILED", states

    from hpc_jobs.checkpoint import latest_complete, verify_checkpoint

    leftovers = sorted(p.name for p in ckpts.iterdir())
    assert Path(tmp.path).exists() or not (ckpts / f"step-{2 * EVERY:08d}.pt.manifest.json").exists(), leftovers
    assert latest_complete(ckpts).name == f"step-{EVERY:08d}.pt", leftovers  # the previous one survived
    verify_checkpoint(ckpts / f"step-{EVERY:08d}.pt")  # full sha256 check

    cli(home, "resume", "ckptkill")
    recover = round(first_step_time(run_dir, 1) - killed_at, 1)
    states = wait_run(home, "ckptkill", timeout=240)
    assert states["train"]["state"] == "COMPLETED", states
    assert starts(run_dir)[1]["from_step"] == EVERY
    assert not list(ckpts.glob("*.tmp-*")), sorted(p.name for p in ckpts.iterdir())  # the torn write was cleaned up
    assert_bit_identical(reference, run_dir)
    assert_interrupted_by(home, "ckptkill", "FAILED")
    record("SIGKILL during a checkpoint write", lost_steps(run_dir), recover,
           write_mb=96, resumed_from=EVERY, torn=tmp.name)
    shutil.rmtree(ckpts)  # ~300 MB of ballast


# ------------------------------------------------------------ 6. slurmd stopped during a 2-node job
def test_node_loss_during_a_two_node_job(slurm_cluster, home, time_limit_run):
    """slurmd of n2 stops while a 2-node training runs; the node is declared DOWN (what slurmctld
    does once SlurmdTimeout passes: 300 s on the dev cluster, so the test does it at once) and the
    rank on n2 dies with it. Slurm ends the job NODE_FAIL and requeues it (--requeue); it resumes
    from its last checkpoint once n2 is back, with no resume command."""
    wait_run(home, "timelimit", timeout=300)  # our own job on n2 must not be the one that fails
    run_dir = launch(home, "nodeloss", "--nodes", "2", "--gpus", "1", "--set", "step_sleep_s=0.08",
                     "--set", "downstream=false")
    jid = job_id(run_dir)
    total = STEPS // 2  # two ranks share each epoch
    wait_training(run_dir, 15, 0)
    rank1 = json.loads((train_dir(run_dir) / "ranks" / "rank1.json").read_text())
    assert rank1["node"] == "n2", rank1
    from hpc_jobs.devcluster.procs import stop_pid

    slurmd = next(d for d in devcluster().daemons() if d.name == "slurmd n2")
    assert slurmd.pid(), "slurmd n2 is not running (python -m hpc_jobs.devcluster up)"
    t0 = time.time()
    try:
        stop_pid(slurmd.pid())
        subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=fault test: slurmd stopped"],
                       check=True, capture_output=True)
        os.kill(rank1["pid"], signal.SIGKILL)  # a dead node takes its processes with it
        with open(train_dir(run_dir) / "trail.jsonl", "a") as fh:
            fh.write(json.dumps({"event": "killed", "step": heartbeat(run_dir).get("step"), "time": time.time()}) + "\n")
    finally:
        up_s = restore_cluster()
    outage = round(time.time() - t0, 1)
    wait_for(lambda: squeue_state(jid) == "PENDING" or len(starts(run_dir)) > 1, 60,
             "Slurm to requeue the job of the lost node")
    assert sacct_history(jid)[0] == "NODE_FAIL", sacct_history(jid)
    # while Slurm holds the requeued job, sacct still says NODE_FAIL: status must follow squeue, and
    # a resume must not submit a second job (also without a cluster:
    # test_reliability_local.py::test_a_job_slurm_requeues_reads_active_and_is_not_resubmitted)
    while_requeued = "-"
    if squeue_state(jid) == "PENDING":
        while_requeued = status_json(home, "nodeloss")["train"]["state"]
        assert while_requeued in ("PENDING", "RUNNING"), while_requeued
        refused = cli(home, "resume", "nodeloss", check=False)
        assert refused.returncode == 2 and "still queued or running" in refused.stderr, refused.stderr
    recover = round(first_step_time(run_dir, 1) - t0, 1)
    states = wait_run(home, "nodeloss", timeout=240)
    assert states["train"]["state"] == "COMPLETED", states
    history = sacct_history(jid)
    assert history == ["NODE_FAIL", "COMPLETED"], history
    assert len(json.loads((run_dir / "run.json").read_text())["stages"]["train"]["history"]) == 1
    lost = lost_steps(run_dir)
    assert len(lost) == 1 and 0 <= lost[0] <= EVERY, trail(run_dir)
    assert final_state(train_dir(run_dir))["step"] == total
    assert_interrupted_by(home, "nodeloss", "NODE_FAIL")
    record("slurmd of n2 stopped (2-node job)", lost, recover, outage_s=outage, restore_s=round(up_s, 1),
           slurm_history=history, status_while_requeued=while_requeued)


# ------------------------------------------------------------------ 8. slurmctld restarted mid-run
def test_controller_restart_while_jobs_run(slurm_cluster, home, reference):
    run_dir = launch(home, "ctld", "--set", "step_sleep_s=0.08")
    wait_training(run_dir, 20, 0)
    assert status_json(home, "ctld")["evaluate"]["state"] == "PENDING"
    from hpc_jobs.devcluster.procs import stop_pid

    ctld = next(d for d in devcluster().daemons() if d.name == "slurmctld")
    assert ctld.pid(), "slurmctld is not running (python -m hpc_jobs.devcluster up)"
    during: Dict[str, Any] = {}

    def status_during_outage():
        t = time.monotonic()
        proc = cli(home, "status", "ctld", "--json", check=False, timeout=120)
        during.update(code=proc.returncode, seconds=time.monotonic() - t, out=proc.stdout, err=proc.stderr)

    t0 = time.time()
    try:
        stop_pid(ctld.pid())
        reader = threading.Thread(target=status_during_outage)
        reader.start()
        time.sleep(3)  # jobs keep running without their controller
    finally:
        up_s = restore_cluster()
    outage = round(time.time() - t0, 1)
    reader.join(timeout=150)
    assert during.get("code") == 0, during
    seen = {s["name"]: s["state"] for s in json.loads(during["out"])["stages"]}
    assert seen["prepare"] == "COMPLETED" and seen["train"] in ("RUNNING", "COMPLETED"), seen
    assert seen["evaluate"] in ("PENDING", "RUNNING", "COMPLETED"), seen
    states = wait_run(home, "ctld", timeout=240)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    assert len(starts(run_dir)) == 1 and lost_steps(run_dir) == []  # never restarted
    assert states["evaluate"]["result"]["step"] == STEPS
    assert_bit_identical(reference, run_dir)
    record("slurmctld restarted mid-run", 0, 0, outage_s=outage, restore_s=round(up_s, 1),
           status_during_outage_s=round(during["seconds"], 1))


# ----------------------------------------------------------------------------- 9. no accounting
def _shim(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _status_with(run_dir: Path, shims: Path, scratch: Path) -> Dict[str, Dict[str, Any]]:
    """``launch.py status RUN_DIR --json`` with ``shims`` first on PATH for that process only, and
    a fresh HPC_JOBS_HOME (so no cached scheduler answer stands in for the shimmed commands)."""
    fresh = scratch / uuid.uuid4().hex[:8]
    env = dict(os.environ, HPC_JOBS_HOME=str(fresh), PATH=f"{shims}{os.pathsep}{os.environ['PATH']}")
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "launch.py", "status", str(run_dir), "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t < 30, "status must not hang without accounting"
    return {s["name"]: s for s in json.loads(proc.stdout)["stages"]}


def test_status_without_accounting(slurm_cluster, home, tmp_path):
    no_sacct = tmp_path / "no-sacct"
    _shim(no_sacct, "sacct", 'echo "sacct: error: Slurm accounting storage is disabled" >&2\nexit 1')
    forgot = tmp_path / "forgot"  # and a controller that forgot the jobs (after MinJobAge)
    _shim(forgot, "sacct", 'echo "sacct: error: Slurm accounting storage is disabled" >&2\nexit 1')
    _shim(forgot, "squeue", "exit 0")

    failed = launch(home, "noacct-fail", "--set", "fail_once=train")
    active = launch(home, "noacct-live", "--set", "step_sleep_s=0.08")
    wait_training(active, 3, 0)
    live = _status_with(active, no_sacct, tmp_path)
    assert states_of(live) == {"prepare": "COMPLETED", "train": "RUNNING", "evaluate": "PENDING"}, live
    assert states_of(live) == states_of(status_json(home, "noacct-live"))  # same as with sacct
    cli(home, "cancel", "noacct-live")
    wait_run(home, "noacct-fail", timeout=120)
    wait_for(lambda: squeue_state(job_id(active)) == "CANCELLED", 60, "the cancel")
    expect_fail = {"prepare": "COMPLETED", "train": "FAILED", "evaluate": "CANCELLED"}
    got = _status_with(failed, no_sacct, tmp_path)
    assert states_of(got) == expect_fail, got
    assert "injected failure in stage train" in got["train"]["error"]
    cancelled = _status_with(active, no_sacct, tmp_path)
    assert states_of(cancelled) == {"prepare": "COMPLETED", "train": "CANCELLED", "evaluate": "CANCELLED"}, cancelled
    # nothing known to the scheduler any more: the stages' own markers still tell how they ended
    markers = _status_with(failed, forgot, tmp_path)
    assert markers["prepare"]["state"] == "COMPLETED" and markers["train"]["state"] == "FAILED", markers
    # and the dependent Slurm cancelled (it never started, so it has no marker) reads CANCELLED
    assert markers["evaluate"]["state"] == "CANCELLED", markers["evaluate"]
    record("no accounting (sacct disabled)", 0, 0, states=states_of(got))


# ------------------------------------------------------------------------------ bad input (cluster)
@pytest.mark.parametrize("args,message", [
    (("--gpus", "3", "--set", "use_gpus=true"),
     "3 GPUs per node asked, but partition 'batch' nodes have 2: use --gpus 2 or more --nodes"),
    (("--nodes", "3"), "3 nodes asked, partition 'batch' has 2: lower --nodes"),
])
def test_more_than_the_cluster_has_is_refused_before_submission(slurm_cluster, home, args, message):
    name = f"toomuch-{uuid.uuid4().hex[:6]}"
    proc = cli(home, "faultlab", "--cluster", "devcluster", "--run-name", name, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (home / "runs" / "faultlab" / name).exists()


# --------------------------------------------------------------------------- 2. a real time limit
def test_time_limit_signal_checkpoints_requeues_and_finishes(slurm_cluster, home, reference, time_limit_run):
    """--time 1 minute, signal lead 30 s (devcluster profile): Slurm sends USR2 before the limit;
    the engine checkpoints, requeues, and a later start finishes. Launched by the first test.

    Slurm checks limits every ~30 s and signals when the limit is within lead + 30 s: with a
    1-minute limit the signal can come seconds after the start, before the engine runs; submitit's
    Checkpointable handler then requeues the stage (nothing trained yet, nothing lost)."""
    run_dir = time_limit_run["run_dir"]
    states = wait_run(home, "timelimit", timeout=300)
    jid = job_id(run_dir)
    history = sacct_history(jid)
    rows = trail(run_dir)
    rows = rows[:next(i for i, r in enumerate(rows) if r["event"] == "done") + 1]
    # the warning can reach the last attempt while its process exits, after the work is done: the
    # job then ends FAILED (test_reliability_local.py::test_a_requeue_signal_after_the_stage_completed_does_not_fail_it)
    exit_race = states["train"]["state"] == "FAILED" and history[-1] == "FAILED"
    if exit_race:
        cli(home, "resume", "timelimit")  # finds the final checkpoint: nothing to train
        states = wait_run(home, "timelimit", timeout=300)
    assert states["train"]["state"] == "COMPLETED", states
    stops = [r for r in rows if r["event"] == "stop"]
    assert stops and all(s["kind"] == "Requeued" and s["requeued"] for s in stops), rows
    starts_ = [r for r in rows if r["event"] == "start"]
    restarts = starts_[-1]["restart"]
    assert history == ["REQUEUED"] * restarts + ["FAILED" if exit_race else "COMPLETED"], history
    at_start_up = restarts - len(stops)  # requeued by submitit's handler before training began
    assert at_start_up >= 0, rows
    assert lost_steps(run_dir) == [0] * len(stops)
    assert starts_[0]["from_step"] == 0 and starts_[-1]["from_step"] == stops[-1]["step"]
    first = [r for r in rows[:rows.index(stops[0])] if r["event"] == "start"][-1]  # the attempt it stopped
    signalled_after = round(stops[0]["time"] - first["time"], 1)
    assert signalled_after < 60, "the signal must come before the 1-minute limit"
    firsts = [r["time"] for r in rows if r["event"] == "first_step"]
    recover = [round(t - s["time"], 1) for s, t in zip(stops, firsts[1:])]
    assert_bit_identical(reference, run_dir)
    assert_interrupted_by(home, "timelimit", "TIMEOUT")
    record("time limit (--time 1 min, USR2@30)", lost_steps(run_dir), recover,
           engine_signalled_after_s=signalled_after, requeues=restarts, requeued_at_start_up=at_start_up,
           total_s=round(rows[-1]["time"] - time_limit_run["launched"], 1), exit_race=exit_race)
