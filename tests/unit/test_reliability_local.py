"""Reliability guarantees that need no cluster: bad handoffs and bad init checkpoints fail in the
job's first seconds with a message that says what to do; the run lock names its holder; a job that
Slurm itself requeues is never submitted a second time by ``resume``.

The cluster half of the fault suite is tests/integration/test_faults.py; docs/reliability.md maps
every guarantee to its test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.pipeline_helpers import REPO, cli, states_of, status_json

LAUNCHERS = "tests.workflows"


@pytest.fixture(autouse=True)
def _faultlab(monkeypatch):
    monkeypatch.setenv("HPC_JOBS_LAUNCHERS", LAUNCHERS)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One complete local faultlab run (1 epoch: 24 steps): its checkpoints are the test material."""
    home = tmp_path_factory.mktemp("finished")
    env = dict(os.environ, HPC_JOBS_HOME=str(home), HPC_JOBS_LAUNCHERS=LAUNCHERS)
    proc = subprocess.run([sys.executable, "launch.py", "faultlab", "--cluster", "local", "--run-name", "done",
                           "--set", "epochs=1", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(json.loads(proc.stdout)["run_dir"])


def _copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run that its stage runners know as their own run directory."""
    import pickle

    target = dest / run_dir.name
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("code"))
    for path in target.glob("stages/*/runner.pkl"):
        runner = pickle.loads(path.read_bytes())
        runner.run_dir = str(target)
        path.write_bytes(pickle.dumps(runner))
    return target


# ---------------------------------------------------------------------------------- bad init weights
def test_init_from_another_architecture_fails_in_the_first_seconds(tmp_path, finished):
    """A checkpoint of another model passed as ``init``: launch cannot see shapes without torch, so
    the train job refuses it before its first step, naming the mismatch and what to do."""
    other = finished / "stages" / "train" / "checkpoints" / "last.pt"  # hidden=16
    t = time.monotonic()
    proc = cli(tmp_path, "faultlab", "--cluster", "local", "--run-name", "arch", "--set", "hidden=32",
               "--set", f"init_from={other}", check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr
    states = status_json(tmp_path, "arch")
    assert states_of(states) == {"prepare": "COMPLETED", "train": "FAILED", "evaluate": "CANCELLED"}, states
    error = states["train"]["error"]
    assert "ArchitectureMismatch" in error and "does not fit this model" in error, error
    assert "another architecture" in error and "init_key_map" in error, error  # says what to do
    run_dir = tmp_path / "runs" / "faultlab" / "arch"
    assert not (run_dir / "stages" / "train" / "checkpoints").exists()  # refused before any step
    marker = json.loads((run_dir / "stages" / "train" / "state.json").read_text())
    assert marker["elapsed_s"] < 30, marker  # in the job's first seconds
    print(f"\n[fault] init from another architecture: refused after {marker['elapsed_s']} s "
          f"(launch to failure {time.monotonic() - t:.1f} s)")


@pytest.mark.parametrize("make,message", [
    (lambda ckpt, tmp: tmp / "absent.pt", "is not a file: pass a checkpoint path"),
    (lambda ckpt, tmp: _truncated(ckpt, tmp), "init_from: incomplete checkpoint"),
])
def test_a_missing_or_torn_init_checkpoint_is_refused_at_launch(tmp_path, finished, make, message):
    path = make(finished / "stages" / "train" / "checkpoints" / "last.pt", tmp_path)
    proc = cli(tmp_path, "faultlab", "--cluster", "local", "--set", f"init_from={path}", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


def _truncated(ckpt: Path, tmp: Path) -> Path:
    """A copy cut short, beside its (copied) manifest: what an interrupted copy leaves."""
    dst = tmp / "cut.pt"
    data = ckpt.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    shutil.copy(str(ckpt) + ".manifest.json", str(dst) + ".manifest.json")
    return dst


# ----------------------------------------------------------------------------- bad handoff in a job
def test_a_torn_upstream_checkpoint_fails_the_next_stage_at_once_naming_what_to_rerun(tmp_path, finished):
    """The ``init`` handoff is verified (size and sha256 against the manifest) before the stage
    function runs: exit code 3 in seconds, and the message names the stage to rerun."""
    run_dir = _copy_run(finished, tmp_path)
    last = run_dir / "stages" / "train" / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    last.unlink()  # a hard link to step-N.pt: replace it, do not write through it
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other hash
    last.write_bytes(bytes(data))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hpc_jobs.runtime", str(run_dir), "evaluate"], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "stage 'evaluate' cannot start: its init input 'weights' from stage 'train' is not a complete " \
           "checkpoint" in proc.stderr, proc.stderr
    assert "corrupt checkpoint" in proc.stderr and "Rerun 'train'" in proc.stderr, proc.stderr
    assert time.monotonic() - t < 30
    marker = json.loads((run_dir / "stages" / "evaluate" / "state.json").read_text())
    assert marker["state"] == "FAILED" and "StageInputError" in marker["error"]


# ------------------------------------------------------------------------------------- the run lock
def test_a_lock_taken_an_instant_ago_names_its_holder(tmp_path, finished, monkeypatch):
    """The holder writes its note right after flock; a second launcher arriving in between must still
    name it (here the note comes 0.1 s after the lock, as on a busy machine)."""
    import fcntl

    from hpc_jobs.errors import RunLockedError
    from hpc_jobs.ledger import Run

    run = Run(_copy_run(finished, tmp_path))
    taken, done = threading.Event(), threading.Event()

    def holder():
        fd = os.open(run.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            taken.set()
            time.sleep(0.1)
            os.write(fd, b"resume by tester@host pid 4242 since 12:00:00")
            done.wait(5)
        finally:
            os.close(fd)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        taken.wait(5)
        with pytest.raises(RunLockedError, match="resume by tester@host pid 4242"):
            with run.lock("resume"):
                pass
    finally:
        done.set()
        thread.join()


def test_a_released_lock_leaves_no_stale_holder(tmp_path, finished):
    """After a launcher finishes, a new one takes the lock at once (flock dies with its process)."""
    run_dir = _copy_run(finished, tmp_path)
    from hpc_jobs.ledger import Run

    run = Run(run_dir)
    with run.lock("launch"):
        pass
    code = ("import sys; from hpc_jobs.ledger import Run; r = Run(sys.argv[1])\n"
            "with r.lock('resume'): print('got it')")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "got it", proc.stderr


# ------------------------------------------------------ a requeue signal after the work is done
def test_a_requeue_signal_after_the_stage_completed_does_not_fail_it(tmp_path):
    """Seen on the dev cluster: a 1-minute limit's USR2 arrived while the last attempt of a train
    stage was exiting; srun reported 'task 0: User defined signal 2' and the job ended FAILED with
    the stage's marker saying COMPLETED. Here the train process sends itself USR2 at exit."""
    proc = cli(tmp_path, "faultlab", "--cluster", "local", "--run-name", "late", "--set", "epochs=1",
               "--set", "downstream=false", "--set", "late_signal=true", check=False, timeout=300)
    states = status_json(tmp_path, "late")
    assert states["train"]["state"] == "COMPLETED" and proc.returncode == 0, (states["train"], proc.stdout[-2000:])


# ------------------------------------------------ a job Slurm requeues after NODE_FAIL stays active
def _shim(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("#!/bin/sh\n" + body + "\n")
    (directory / name).chmod(0o755)


@pytest.fixture
def requeued_after_node_fail(tmp_path, finished):
    """A slurm-backend run whose train job (990002) ended NODE_FAIL and which Slurm has requeued:
    sacct's record still says NODE_FAIL, squeue says PENDING (what tests/integration/test_faults.py
    saw on the dev cluster for ~10 s, and for as long as the queue keeps it waiting on a real one)."""
    run_dir = _copy_run(finished, tmp_path / "runs")
    record = json.loads((run_dir / "run.json").read_text())
    record.update(backend="slurm", cluster="devcluster")
    # train is the last stage (nothing downstream pending on it would keep resume away)
    record["order"].remove("evaluate")
    del record["stages"]["evaluate"]
    ids = {"prepare": "990001", "train": "990002"}
    for name, jid in ids.items():
        record["stages"][name].update(state="SUBMITTED", jobs=[{"job_id": jid}],
                                      history=[{"submitted": time.time(), "job_ids": [jid]}])
    (run_dir / "run.json").write_text(json.dumps(record))
    stage = run_dir / "stages"
    (stage / "prepare" / "state.json").write_text(json.dumps({"state": "COMPLETED", "job_id": "990001"}))
    (stage / "train" / "state.json").write_text(json.dumps({"state": "RUNNING", "job_id": "990002"}))
    shims = tmp_path / "bin"
    rows = "990001|COMPLETED|00:00:01|0:0|n1|None\\n990002|NODE_FAIL|00:00:12|0:0|n[1-2]|None"
    _shim(shims, "sacct", f'printf "{rows}\\n"')
    queue = "990002|PENDING|0:00|(null)|BeginTime|990002|N/A"
    _shim(shims, "squeue", f'printf "{queue}\\n"')
    submitted = tmp_path / "sbatch-was-called"
    _shim(shims, "sbatch", f'touch "{submitted}"; echo "sbatch: error: shim" >&2; exit 1')
    for tool in ("scontrol", "sinfo", "scancel"):
        _shim(shims, tool, "exit 0")
    env = dict(os.environ, HPC_JOBS_HOME=str(tmp_path / "home"), PATH=f"{shims}{os.pathsep}{os.environ['PATH']}")
    return run_dir, env, submitted


def test_a_job_slurm_requeues_reads_active_and_is_not_resubmitted(requeued_after_node_fail):
    run_dir, env, submitted = requeued_after_node_fail

    def launch_py(*args):
        return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)

    status = launch_py("status", str(run_dir), "--json")
    assert status.returncode == 0, status.stderr
    train = {s["name"]: s for s in json.loads(status.stdout)["stages"]}["train"]
    resume = launch_py("resume", str(run_dir))
    assert not submitted.exists(), f"resume submitted a second train job:\n{resume.stdout}\n{resume.stderr}"
    assert resume.returncode == 2 and "still queued or running" in resume.stderr, resume.stderr
    assert train["state"] == "PENDING", train


def test_local_ranks_report_the_rank_that_failed_first_not_one_stopped_after_it():
    """A rank that fails on its own is the one reported: the ranks stopped because of it (SIGTERM,
    -15) are not, so the exit code and the log shown say why the task failed."""
    from hpc_jobs.backends.local import LocalBackend

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failer = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    codes, first = LocalBackend._wait([sleeper, failer])
    assert first == 1 and codes[1] == 7
    assert codes[0] == -15  # stopped, not waited for for a minute
    assert LocalBackend._wait([subprocess.Popen([sys.executable, "-c", "pass"])]) == ([0], None)
