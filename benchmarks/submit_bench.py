"""Submitting a 200-task array to the dev cluster: hpc-jobs against bare ``sbatch --array`` and
plain submitit's ``map_array``.

- bare ``sbatch --array=0-199 --output=/dev/null --wrap=true`` (the baseline);
- plain submitit: ``AutoExecutor.map_array`` over 200 items (it pickles one call per task, then
  submits one ``sbatch --array``);
- hpc-jobs: the whole launch path in-process (``hpc_jobs.launch.launch``: plan, preflight with
  ``sbatch --test-only``, run record with the code snapshot, one runner per task, one ``sbatch``)
  of a one-stage workflow ``Stage(array=200)``.

Every variant submits HELD jobs: an ``sbatch`` shim first on PATH adds ``--hold`` to every call of
all three (Slurm 22.05's sbatch has no environment variable for it), and the jobs are cancelled
right after each repetition, so nothing runs and the queue is empty before the next one (queue
length changes sbatch's latency). Repetitions are interleaved. Nothing asserts a time.

Run: ``python -m benchmarks.submit_bench [--reps N]``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import scancel, slurm_main, summary, table, timed  # noqa: E402
from hpc_jobs import Pipeline, Resources, Stage, Workflow, register  # noqa: E402

TASKS = 200
BASELINE = f"bare sbatch --array=0-{TASKS - 1} (baseline)"


def _noop(ctx):
    return None


@dataclass
class ArrayConfig:
    tasks: int = TASKS


@register
class BenchArray(Workflow):
    name = "bench_array"
    summary = "benchmark: one stage, an array of no-op tasks"
    Config = ArrayConfig

    def build(self):
        res = Resources(time="00:05:00", mem="100M")
        return Pipeline(self.name, [Stage("tasks", _noop, resources=res, array=self.config.tasks)])


@contextlib.contextmanager
def held(folder: Path) -> Iterator[None]:
    """Every ``sbatch`` run by this process (or its children) in here submits held jobs: a shim
    first on PATH that calls the real one with ``--hold``."""
    real = shutil.which("sbatch")
    if not real:
        raise RuntimeError("no sbatch on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "sbatch"
    shim.write_text(f'#!/bin/sh\nexec {real} --hold "$@"\n')
    shim.chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{folder}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _noop_item(x):
    return x


#: the steps of hpc_jobs.launch.launch, timed on the side (hpc_jobs' rows only): where its time goes
PHASES = (("make_plan", "plan (workflow lookup, profile, config, pipeline)"),
          ("preview_jobs", "render"),
          ("start_preflight", "preflight (the scheduler's partitions, asked in a thread at the start, checked; "
                              "`sbatch --test-only` started)"),
          ("record_run", "record (run directory, runner pickle, run.json, the snapshot moved in), while Slurm "
                         "answers the test"),
          ("start", "submit (the script for its job ids, ONE sbatch, run.json with the job ids, fsync)"))


@contextlib.contextmanager
def timed_phases(into: Dict[str, List[float]]) -> Iterator[None]:
    """Time each of :data:`PHASES` in ``hpc_jobs.launch`` while inside (one sample per call)."""
    import time

    from hpc_jobs import launch as launchmod

    saved = {name: getattr(launchmod, name) for name, _ in PHASES}

    def wrap(name, fn):
        def timed_fn(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into.setdefault(name, []).append(time.perf_counter() - t0)
        return timed_fn

    for name, fn in saved.items():
        setattr(launchmod, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(launchmod, name, fn)


def phase_note(phases: Dict[str, List[float]], total_s: Optional[float] = None) -> str:
    """``total_s``: the launch's median; what the phases leave of it is waiting (see below)."""
    import statistics

    medians = {name: statistics.median(phases[name]) for name, _ in PHASES if phases.get(name)}
    parts = [f"{label} {medians[name] * 1000:.0f} ms" for name, label in PHASES if name in medians]
    if total_s is not None:
        rest = max(0.0, total_s - sum(medians.values()))
        parts.append(f"the rest (waiting for MaxArraySize, asked in a thread at the start, for the code snapshot "
                     f"and for Slurm's answer to the test) {rest * 1000:.0f} ms")
    return "Where hpc-jobs' time goes (medians of its repetitions): " + "; ".join(parts) + "."


def bench_submit_array(reps: int, home: Path, phases: Optional[Dict[str, List[float]]] = None) -> Dict[str, Dict[str, float]]:
    import subprocess

    import submitit

    from hpc_jobs.launch import LaunchRequest, launch

    ids: List[str] = []
    old_home = os.environ.get("HPC_JOBS_HOME")
    os.environ["HPC_JOBS_HOME"] = str(home)

    def bare_sbatch():
        out = subprocess.run(["sbatch", "--parsable", f"--array=0-{TASKS - 1}", "--partition=batch",
                              "--time=5", "--output=/dev/null", "--job-name=bench-array", "--wrap=true"],
                             capture_output=True, text=True, check=True).stdout
        ids.append(out.strip().split(";")[0])

    def plain_submitit():
        ex = submitit.AutoExecutor(folder=home / "submitit", cluster="slurm")
        ex.update_parameters(timeout_min=5, slurm_partition="batch", slurm_job_name="bench-array")
        jobs = ex.map_array(_noop_item, range(TASKS))
        ids.append(jobs[0].job_id.split("_")[0])

    def hpc_jobs():
        with timed_phases(phases if phases is not None else {}):
            result = launch(LaunchRequest(workflow="bench_array", cluster="devcluster"), echo=lambda s: None)
        ids.extend(result.run.stage("tasks").job_ids())

    def clean():
        scancel(ids)
        ids.clear()

    results: Dict[str, List[float]] = {
        BASELINE: [],
        f"plain submitit: map_array over {TASKS} items": [],
        f"hpc-jobs launch: Stage(array={TASKS}) (preflight + ledger + submit)": [],
    }
    fns = [bare_sbatch, plain_submitit, hpc_jobs]
    try:
        with held(home / "held-sbatch"):
            for _ in range(reps):  # interleaved, so load on the machine hits every contender alike
                for name, fn in zip(results, fns):
                    clean()
                    results[name] += timed(fn, 1)
    finally:
        clean()
        if old_home is None:
            os.environ.pop("HPC_JOBS_HOME", None)
        else:
            os.environ["HPC_JOBS_HOME"] = old_home
    return {name: summary(samples) for name, samples in results.items()}


def report(reps: int, home: Path) -> str:
    from benchmarks.common import wait_for_room

    wait_for_room(3 * TASKS * reps)  # cancelled tasks stay job records for MinJobAge
    phases: Dict[str, List[float]] = {}
    results = bench_submit_array(reps, home, phases)
    sub = results[f"plain submitit: map_array over {TASKS} items"]["median"]
    ours = results[f"hpc-jobs launch: Stage(array={TASKS}) (preflight + ledger + submit)"]["median"]
    ratio = ours / sub if sub else float("inf")
    notes = [f"hpc-jobs / plain submitit: {ratio:.2f}x (goal: at or below 1.0: {'reached' if ratio <= 1.0 else 'NOT reached'}). "
             "hpc-jobs does more than submitit here: preflight (scheduler partitions, `sbatch --test-only`), the run "
             "record and the code snapshot, with the scheduler's facts and the snapshot taken in threads while it "
             "plans and checks, and the run recorded while Slurm answers the test (removed again if it rejects a "
             "script). The snapshot links each file unchanged since the previous launch's copy (a hard link: no "
             "data written), so repeated launches write only what changed. Its array tasks write their own "
             "submitit pickles when they start, so it writes no file per task (submitit writes "
             f"{TASKS} pickles before its sbatch).", "", phase_note(phases, ours)]
    return table(f"submit: an array of {TASKS} tasks to the dev cluster (held, cancelled after each repetition)",
                 results, BASELINE, notes=notes)


def main(argv=None) -> int:
    return slurm_main("python -m benchmarks.submit_bench", __doc__, report, reps=5, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
