"""Slurm backend: submit each rendered script through submitit, at a bounded rate.

submitit's executor pickles the callable, submits, and its ``submitit.core._submit`` entry runs it
in every task, handles the requeue signal, and writes results. We configure it to submit OUR
rendered script (the one ``--dry-run`` shows) instead of its own, replace its fixed 0.2 s sleep
between submissions with a rate limiter (the profile's ``submit_rate``), and submit arrays from the
same script (submitit would otherwise build a new executor with its own script for arrays).

An array writes no file per task at submission: its script runs this module
(``python -m hpc_jobs.backends.slurm FOLDER``, :data:`hpc_jobs.render.ARRAY_ENTRY`), which in the
task makes the task's submitit pickle (``<jobid>_<a>_submitted.pkl``, the same object submitit
would have written: the stage's ``runner.pkl`` for task ``HPC_JOBS_ARRAY_OFFSET + a``, with
submitit's timeout count) unless it exists (a requeued task keeps its checkpointed one), then
hands over to submitit's own entry. Submitting 1,000 tasks is one ``sbatch``, not 1,000 pickles.
A run launched before this (its script runs ``submitit.core._submit``) gets the pickles at
submission as before.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import submitit
from submitit.core import utils as submitit_utils

from .. import render as rendermod
from ..errors import SubmitError, command
from ..fsutil import atomic_write_text
from ..record import JobRecord, array_directive, task_chunks
from ..spec import parse_time


class RateLimiter:
    """At most ``rate`` submissions per second, never in bursts (shared by one launch)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self._last = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        delay = self._last + self.interval - now
        if delay > 0:
            time.sleep(delay)
        self._last = time.monotonic()


class RenderedScriptExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor whose sbatch script is the one hpc-jobs rendered."""

    def __init__(self, folder: Path, script: str, limiter: RateLimiter, num_tasks: int, timeout_min: int):
        super().__init__(folder=folder, max_num_timeout=3)
        self._script = script
        self._limiter = limiter
        self._tasks = num_tasks
        self.parameters["time"] = timeout_min  # submitit counts timeouts against it

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return self._script

    def _throttle(self) -> None:
        self._limiter.wait()

    def _num_tasks(self) -> int:
        return self._tasks

    def submit_lazy_array(self) -> str:
        """One sbatch for a script that runs :data:`~hpc_jobs.render.ARRAY_ENTRY`: each task makes
        its own pickle when it starts (:func:`task_pickle`); nothing per task is written here.
        Returns the array's job id."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._throttle()
        return str(self._submit_command(self._submitit_command_str).job_id)

    def submit_array(self, fns: List[Any], indices: Optional[List[int]] = None) -> List[submitit.Job]:  # type: ignore[override]
        """One sbatch for the whole array; the task at Slurm index ``a`` loads
        ``<jobid>_<a>_submitted.pkl`` (``indices``: the index of each of ``fns``, default 0..n-1)."""
        indices = list(range(len(fns))) if indices is None else list(indices)
        folder = submitit_utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickles = []
        for fn in fns:
            delayed = submitit_utils.DelayedSubmission(fn)
            delayed.set_timeout(self.parameters["time"], self.max_num_timeout)
            path = folder / f"{uuid.uuid4().hex}.pkl"
            delayed.dump(path)
            pickles.append(path)
        self._throttle()
        first = self._submit_command(self._submitit_command_str)
        jobs = [submitit.SlurmJob(folder=self.folder, job_id=f"{first.job_id}_{a}", tasks=list(range(self._tasks)))
                for a in indices]
        for job, path in zip(jobs, pickles):
            job.paths.move_temporary_file(path, "submitted_pickle")
        return jobs


def dependencies_for(run: Any, rec: Any, part: Optional[Tuple[int, List[int]]],
                     submitted: Dict[str, List[Optional[int]]],
                     active: Dict[str, List[str]]) -> List[rendermod.Dependency]:
    """Slurm dependencies of one job of ``rec``: aftercorr on a per-task parent array submitted
    with the same tasks and indices in this call, afterok on every other parent job being
    (re)submitted now (``submitted``) or still queued or running (``active``)."""
    whole: List[str] = []
    corr: List[str] = []
    per_task = set(rec.per_task_parents())
    for parent in rec.depends_on:
        p = run.stage(parent)
        if p.where != "batch":
            continue
        if parent in submitted:
            if parent in per_task and rec.array and p.array and part is not None:
                same = [j for j in p.jobs if j.tasks == part[1] and j.offset == part[0]]
                if same:
                    corr.append(same[0].job_id)
                    continue
                rerun = set(submitted[parent])
                ids = {p.job_for_task(t).job_id for t in part[1] if t in rerun and p.job_for_task(t)}
                whole.extend(sorted(ids))  # the parent reran other tasks: wait for those holding ours
            else:
                whole.extend(p.job_ids())
        elif parent in active:
            whole.extend(active[parent])
    deps = []
    if whole:
        deps.append(rendermod.Dependency("afterok", whole))
    if corr:
        deps.append(rendermod.Dependency("aftercorr", corr))
    return deps


class SlurmBackend:
    name = "slurm"

    def __init__(self) -> None:
        self.limiter: RateLimiter = RateLimiter(0)

    def configure(self, submit_rate: float) -> None:
        self.limiter = RateLimiter(submit_rate)

    # -- the backend interface -------------------------------------------------------------------
    def start(self, run: Any, selection: Dict[str, List[Optional[int]]], echo: Callable[[str], None],
              active: Optional[Dict[str, List[str]]] = None) -> Dict[str, set]:
        """Submit the selected stage tasks (in order): an array stage submits only the selected
        tasks (``--array=1,5``), at their own indices; each job depends on its parents. Returns
        nothing not done: the jobs run on their own."""
        self.configure(float(run.record.get("submit_rate") or 0))
        max_array = int(run.record.get("max_array_size") or 1001)
        submitted: Dict[str, List[Optional[int]]] = {}
        for name, tasks in selection.items():
            rec = run.stage(name)
            if rec.where != "batch":
                continue
            with open(run.stage_dir(name) / "runner.pkl", "rb") as fh:
                runner = pickle.load(fh)
            template = rec.job_templates[0]
            throttle = str(template.get("array") or "").partition("%")[2]
            parts: List[Optional[Tuple[int, List[int]]]] = (
                list(task_chunks([t for t in tasks if t is not None], max_array)) if rec.array else [None])
            jobs: List[JobRecord] = []
            for i, part in enumerate(parts):
                deps = dependencies_for(run, rec, part, submitted, active or {})
                array = array_directive(part[1], part[0], int(throttle) if throttle else None) if part else None
                directives = [tuple(d) for d in template["directives"]
                              if d[0] not in ("dependency", "kill-on-invalid-dep", "array")]
                if array:
                    directives.append(("array", array))
                if deps:
                    directives += [("dependency", ",".join(d.render() for d in deps)), ("kill-on-invalid-dep", "yes")]
                env = [tuple(e) for e in template.get("env") or []]
                if part is not None and any(k == "HPC_JOBS_ARRAY_OFFSET" for k, _ in env):
                    env = sorted([(k, v) for k, v in env if k != "HPC_JOBS_ARRAY_OFFSET"]
                                 + [("HPC_JOBS_ARRAY_OFFSET", str(part[0]))])
                script = str(run.stage_dir(name) / ("job.sbatch" if i == 0 else f"job.chunk{i}.sbatch"))
                job = rendermod.JobScript(**{**template, "directives": directives, "dependencies": deps,
                                             "array": array, "script_path": script, "env": env})
                text = rendermod.render(job)
                atomic_write_text(script, text, mode=0o700, fsync=False)  # rebuilt from run.json
                folder = rendermod.submitit_folder(run.stage_dir(name))
                timeout_min = max(1, int(parse_time(rec.time_limit) // 60))
                try:
                    if part is not None:
                        # the tasks make their own pickles; a script from before ARRAY_ENTRY: one per task, here
                        runners = [] if lazy_array(text) else [runner.for_task(t) for t in part[1]]
                        job_id = self.submit(folder, text, runners, rec.world_size, timeout_min,
                                             array=[t - part[0] for t in part[1]])
                        jobs.append(JobRecord(job_id, script=script, array=array, tasks=list(part[1]), offset=part[0]))
                    else:
                        job_id = self.submit(folder, text, [runner], rec.world_size, timeout_min, array=None)
                        jobs.append(JobRecord(job_id, script=script))
                except SubmitError as exc:
                    _submit_failed(run, name, jobs, exc)
            rec.record_submission(jobs, time.time())
            rec.reason = ""
            submitted[name] = list(tasks)
            run.save(durable=False)  # the job ids are on disk before the next submission
        run.save()
        from .. import poller

        poller.invalidate()  # status asks the scheduler again soon, whoever asks
        return {}

    def submit(self, folder: Path, script: str, runners: List[Any], num_tasks: int, timeout_min: int,
               array: Optional[List[int]]) -> str:
        """Submit one job, or one array job whose Slurm indices are ``array`` (one per runner, or
        none when the script runs ARRAY_ENTRY); return its Slurm job id."""
        executor = RenderedScriptExecutor(folder, script, self.limiter, num_tasks, timeout_min)
        try:
            if array is not None and lazy_array(script):
                return executor.submit_lazy_array()
            if array is not None:
                jobs = executor.submit_array(runners, array)
                return jobs[0].job_id.split("_")[0]
            job = executor.submit(runners[0])
        except submitit_utils.FailedJobError as exc:  # sbatch exited non-zero: its stderr is the message
            lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
            raise SubmitError(lines[-1] if lines else "sbatch failed without a message") from exc
        return str(job.job_id)


def lazy_array(script: str) -> bool:
    """The script's tasks make their own pickles (it runs ARRAY_ENTRY)."""
    return f"-m {rendermod.ARRAY_ENTRY} " in script


#: submitit's count of time-limit requeues a job may take (RenderedScriptExecutor's max_num_timeout)
MAX_NUM_TIMEOUT = 3


def task_pickle(folder: str, environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """In an array task: this task's submitit pickle, written from the stage's ``runner.pkl`` for
    task ``HPC_JOBS_ARRAY_OFFSET + SLURM_ARRAY_TASK_ID`` unless it exists already (a requeued task
    finds its first start's, or the one submitit's requeue handler checkpointed). Only rank 0
    writes it (atomically); the other ranks wait for it in submitit's entry. None: not an array task."""
    array_job, index = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if not array_job or index is None:
        return None
    target = submitit_utils.JobPaths(folder, job_id=f"{array_job}_{index}").submitted_pickle
    if target.exists() or environ.get("SLURM_PROCID", "0") != "0":
        return target
    from ..runtime import RUNNER_FILE

    with open(Path(folder).parent / RUNNER_FILE, "rb") as fh:
        runner = pickle.load(fh)
    delayed = submitit_utils.DelayedSubmission(runner.for_task(int(environ.get("HPC_JOBS_ARRAY_OFFSET") or 0) + int(index)))
    delayed.set_timeout(int(environ.get("HPC_JOBS_TIMEOUT_MIN") or 0), MAX_NUM_TIMEOUT)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as fh:
        pickle.dump(delayed, fh, pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, target)
    return target


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m hpc_jobs.backends.slurm FOLDER``: an array task's entry (see the module doc)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hpc_jobs.backends.slurm SUBMITIT_FOLDER (an array task's entry)", file=sys.stderr)
        return 2
    task_pickle(args[0])
    from submitit.core.submission import process_job

    process_job(args[0])
    return 0


def _submit_failed(run: Any, name: str, jobs: List[JobRecord], exc: Exception) -> None:
    """sbatch refused ``name``: keep what was submitted on disk, then one line saying what to do."""
    submitted = [n for n in run.order if n != name and run.stage(n).state == "SUBMITTED"]
    if jobs:  # an array split in chunks: the chunks already queued belong to the ledger too
        run.stage(name).record_submission(jobs, time.time())
    run.save()
    kept = f"stages already queued keep running ({', '.join(submitted)}); " if submitted else "nothing was queued; "
    raise SubmitError(f"sbatch refused stage '{name}': {exc}. {kept}fix the cause, then "
                      f"`{command()} resume {run.id}` submits the rest") from exc


if __name__ == "__main__":
    sys.exit(main())
