"""Scale: a run with a 1,000-task array on the dev cluster: launch, ``status RUN``, ``status RUN
STAGE`` and scheduler calls, against plain submitit where it has the same operation.

- launch: the whole hpc-jobs launch path in-process (plan, preflight with ``sbatch --test-only``,
  run record with the code snapshot, ONE ``sbatch`` of the array) against plain submitit's
  ``map_array`` over 1,000 items (one pickle per task, one ``sbatch``); held jobs (the sbatch shim
  of :mod:`benchmarks.submit_bench`), cancelled after each repetition, interleaved.
- status: ``python launch.py status RUN`` and ``status RUN tasks`` as a user runs them (a new
  process each time, warm bytecode), on the held run (no task has started: no task files) and
  on the same run after every task reported itself RUNNING (each task's marker, heartbeat and
  attempt log written as the runtime writes them). Goal: under 1 s each; submitit has no run
  view to compare with.
- calls: scheduler calls in a simulated hour of ``status RUN`` every 10 s (a new process each
  time) for a 1-task and a 1,000-task array, against submitit's watcher of the same jobs
  (:func:`benchmarks.poll_bench.measure`, pattern B).

Run: ``python -m benchmarks.scale_bench [--reps N]``. Nothing asserts a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, scancel, slurm_main, summary, table, timed  # noqa: E402

TASKS = 1000
GOAL_S = 1.0


def _noop_item(x):
    return x


def bench_launch(reps: int, home: Path):
    """``({row: summary}, the last hpc-jobs run)``: that run stays held for the status and calls
    measurements (the caller cancels it)."""
    import submitit

    from benchmarks.submit_bench import held
    from hpc_jobs.launch import LaunchRequest, launch

    ids: List[str] = []
    kept = []
    os.environ["HPC_JOBS_HOME"] = str(home)

    def plain_submitit():
        ex = submitit.AutoExecutor(folder=home / "submitit", cluster="slurm")
        ex.update_parameters(timeout_min=5, slurm_partition="batch", slurm_job_name="bench-scale",
                             slurm_array_parallelism=TASKS)
        jobs = ex.map_array(_noop_item, range(TASKS))
        ids.append(jobs[0].job_id.split("_")[0])

    def hpc_jobs():
        result = launch(LaunchRequest(workflow="bench_array", cluster="devcluster", overrides={"tasks": TASKS}),
                        echo=lambda s: None)
        kept[:] = [result.run]

    results: Dict[str, List[float]] = {
        f"plain submitit: map_array over {TASKS} items (baseline)": [],
        f"hpc-jobs launch: Stage(array={TASKS}) (preflight + ledger + submit)": [],
    }
    try:
        with held(home / "held-sbatch"):
            for _ in range(reps):
                for name, fn in zip(results, (plain_submitit, hpc_jobs)):
                    scancel(ids)  # an empty queue before each submission (its length changes sbatch's latency)
                    ids.clear()
                    if kept and fn is hpc_jobs:
                        scancel(kept[0].stage("tasks").job_ids())
                    results[name] += timed(fn, 1)
    finally:
        scancel(ids)
    return {name: summary(samples) for name, samples in results.items()}, kept[0]


def _report_running(run) -> None:
    """Every task's files as the runtime writes them at its start (marker, attempt log) and as the
    engine writes progress (heartbeat)."""
    from hpc_jobs.fsutil import atomic_write_json

    job = run.stage("tasks").job_ids()[0]
    stage_dir = run.stage_dir("tasks")
    now = time.time()
    started = datetime.fromtimestamp(now, timezone.utc).isoformat()  # just started: well within the limit
    for i in range(TASKS):
        where = stage_dir / "tasks" / str(i)
        where.mkdir(parents=True, exist_ok=True)
        atomic_write_json(where / "state.json", {"stage": "tasks", "task": i, "host": "n1", "job_id": f"{job}_{i}",
                                                "attempt": 0, "started": started,
                                                "state": "RUNNING"}, fsync=False)
        (where / "attempts.jsonl").write_text(json.dumps({"time": now, "event": "start", "job_id": f"{job}_{i}",
                                                          "attempt": 0, "host": "n1"}) + "\n")
        atomic_write_json(where / "heartbeat.json", {"time": now, "step": 10, "total_steps": 100, "loss": 0.5},
                          fsync=False)


def bench_status(reps: int, home: Path, run) -> Dict[str, Dict[str, float]]:
    """``status`` of the held ``run`` (its 1,000 tasks), first as it is, then with every task's files."""
    env = dict(os.environ, HPC_JOBS_HOME=str(home))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(home / "pycache")  # warm bytecode, as an installed package has

    def status(*args: str) -> None:
        subprocess.run([sys.executable, "launch.py", "status", str(run.dir), *args], cwd=REPO, env=env, check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)

    out: Dict[str, Dict[str, float]] = {}
    status()  # warm-up: bytecode, the poller's first answer
    for label, prepare in (("held, no task started", None), ("every task reported RUNNING", _report_running)):
        if prepare:
            prepare(run)
        out[f"status RUN ({label})"] = summary(timed(lambda: status(), reps))
        out[f"status RUN tasks: the 1,000-row task table ({label})"] = summary(timed(lambda: status("tasks"), reps))
    return out


def status_table(results: Dict[str, Dict[str, float]]) -> str:
    lines = [f"### scale: `status` of a run with a {TASKS:,}-task array (a new process each time)", "",
             "| what | median s | min | max | n | goal | reached |", "|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {s['n']} | < {GOAL_S:g} s "
                     f"| {'yes' if s['median'] < GOAL_S else 'NO'} |")
    return "\n".join(lines)


def calls_table(res: Dict[str, Dict[int, float]]) -> str:
    sizes = sorted({n for row in res.values() for n in row})
    sub, ours = res["submitit B"], res["hpc-jobs B"]
    lines = [f"### scale: scheduler calls in an hour of `status RUN` every 10 s (a new process each time)", "",
             "| array | plain submitit's watcher (baseline) | hpc-jobs `status` | ratio |", "|---|---|---|---|"]
    for n in sizes:
        lines.append(f"| {n:,} task{'s' if n > 1 else ''} | {sub[n]:g} | {ours[n]:g} | "
                     f"{(ours[n] / sub[n]) if sub[n] else 0:.2f}x |")
    return "\n".join(lines + ["", "The same held arrays, simulated hour, counting shim (as in the polling section)."])


def report(reps: int, home: Path) -> str:
    from benchmarks import poll_bench
    from benchmarks.common import wait_for_room

    reps_launch = min(reps, 2)  # every cancelled task is a job record for MinJobAge: 2,000 a repetition
    wait_for_room(2 * TASKS * reps_launch + 10)
    launched, run = bench_launch(reps_launch, home / "launch")
    try:
        launch = table(f"scale: launching a {TASKS:,}-task array to the dev cluster (held, cancelled after each "
                       f"repetition)", launched)
        # the calls first: the status measurement then writes every task's files into the run
        calls = calls_table(poll_bench.measure(0.0, patterns="B", sizes=(1, TASKS), work=home / "calls", replay=True,
                                               given={TASKS: run}))
        status = status_table(bench_status(reps, home / "launch", run))
    finally:
        scancel(run.stage("tasks").job_ids())
    return "\n\n".join([launch, status, calls])


def main(argv=None) -> int:
    return slurm_main("python -m benchmarks.scale_bench", __doc__, report, reps=3, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
