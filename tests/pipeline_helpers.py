"""Helpers shared by the tests that launch whole pipelines through the real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]


def _env(home: Path) -> Dict[str, str]:
    return dict(os.environ, HPC_JOBS_HOME=str(home), PYTHONUNBUFFERED="1")


def cli(home: Path, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python launch.py ARGS`` as a user would, with its own HPC_JOBS_HOME."""
    proc = subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=_env(home), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_side_by_side(*calls: Tuple[Path, Sequence[str]], timeout: float = 600) -> List[subprocess.CompletedProcess]:
    """Run several ``python launch.py ARGS`` at once, each ``(HPC_JOBS_HOME, ARGS)``, and wait for all;
    each must exit 0. For a chain that leaves a core idle (one rank, one torch thread) and a cheap one
    (an untrained baseline) beside it. Each has its own home: its data set is generated there."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, (home, args) in enumerate(calls):
            out, err = open(Path(tmp) / f"{i}.out", "w+"), open(Path(tmp) / f"{i}.err", "w+")
            procs.append((args, out, err, subprocess.Popen(
                [sys.executable, "launch.py", *args], cwd=REPO, env=_env(home),
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True, start_new_session=True)))
        deadline = time.monotonic() + timeout
        done = []
        try:
            for args, out, err, proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                out.seek(0), err.seek(0)
                done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
        finally:
            for _, out, err, proc in procs:
                if proc.poll() is None:  # timed out, or the test was interrupted: its ranks go too
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                out.close(), err.close()
    for (_, args), proc in zip(calls, done):
        if proc.returncode != 0:
            raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return done


def trained_and_untrained(tmp_path_factory: Any, workflow: str, gpus: int, timeout: float,
                          untrained_gpus: int = 0) -> Tuple[Path, Path, subprocess.CompletedProcess,
                                                            subprocess.CompletedProcess]:
    """``launch.py WORKFLOW --cluster local --gpus N`` as run ``trained`` and, beside it, the same
    with ``--set train.epochs=0`` as run ``untrained`` (the baseline; ``untrained_gpus``: its
    ranks, default N), each in a home of its own. Returns both homes and both processes."""
    home = tmp_path_factory.mktemp(f"{workflow}-local")
    base = tmp_path_factory.mktemp(f"{workflow}-local-untrained")
    common = [workflow, "--cluster", "local", "--gpus"]
    trained, untrained = cli_side_by_side(
        (home, [*common, str(gpus), "--run-name", "trained"]),
        (base, [*common, str(untrained_gpus or gpus), "--run-name", "untrained", "--set", "train.epochs=0"]),
        timeout=timeout)
    return home, base, trained, untrained


def launch_json(home: Path, *args: str, **kw) -> Dict[str, Any]:
    proc = cli(home, *args, "--json", **kw)
    return json.loads(proc.stdout)


def status_json(home: Path, run: str) -> Dict[str, Dict[str, Any]]:
    data = json.loads(cli(home, "status", run, "--json").stdout)
    return {s["name"]: s for s in data["stages"]}


def wait_run(home: Path, run: str, timeout: float = 300, poll: float = 1.0) -> Dict[str, Dict[str, Any]]:
    """Poll ``status --json`` until no stage is queued or running."""
    deadline = time.monotonic() + timeout
    states: Dict[str, Dict[str, Any]] = {}
    while time.monotonic() < deadline:
        states = status_json(home, run)
        if all(s["state"] not in ("PENDING", "RUNNING", "REQUEUED", "PREEMPTED", "SUBMITTED", "PLANNED", "UNKNOWN") for s in states.values()):
            return states
        time.sleep(poll)
    raise AssertionError(f"run {run} not finished after {timeout}s: {({k: v['state'] for k, v in states.items()})}")


def states_of(states: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    return {k: v["state"] for k, v in states.items()}


def job_ids(launch: Dict[str, Any]) -> Dict[str, List[str]]:
    return {s["name"]: s["job_ids"] for s in launch["stages"]}


def workflow_lines(stdout: str) -> List[str]:
    """A local launch's output without the framework's per-attempt banner lines (``[hpc_jobs] ...``)
    that open and close every stage's log: what the workflow itself printed, in order."""
    return [line for line in stdout.splitlines() if "[hpc_jobs]" not in line]
