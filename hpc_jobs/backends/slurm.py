"""Slurm backend: submit each rendered script through submitit, at a bounded rate.

submitit's executor pickles the callable, submits, and its ``submitit.core._submit`` entry runs it
in every task, handles the requeue signal, and writes results. We configure it to submit OUR
rendered script (the one ``--dry-run`` shows) instead of its own, replace its fixed 0.2 s sleep
between submissions with a rate limiter (the profile's ``submit_rate``), and submit arrays from the
same script (submitit would otherwise build a new executor with its own script for arrays).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, List

import submitit
from submitit.core import utils as submitit_utils

from ..errors import SubmitError


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

    def submit_array(self, fns: List[Any]) -> List[submitit.Job]:  # type: ignore[override]
        """One sbatch for the whole array; task ``a`` loads ``<jobid>_<a>_submitted.pkl``."""
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
                for a in range(len(fns))]
        for job, path in zip(jobs, pickles):
            job.paths.move_temporary_file(path, "submitted_pickle")
        return jobs


class SlurmBackend:
    name = "slurm"

    def __init__(self) -> None:
        self.limiter: RateLimiter = RateLimiter(0)

    def configure(self, submit_rate: float) -> None:
        self.limiter = RateLimiter(submit_rate)

    def submit(self, folder: Path, script: str, runners: List[Any], num_tasks: int, timeout_min: int,
               array: bool) -> str:
        """Submit one job (or one array chunk); return its Slurm job id."""
        executor = RenderedScriptExecutor(folder, script, self.limiter, num_tasks, timeout_min)
        try:
            if array:
                jobs = executor.submit_array(runners)
                return jobs[0].job_id.split("_")[0]
            job = executor.submit(runners[0])
        except submitit_utils.FailedJobError as exc:  # sbatch exited non-zero: its stderr is the message
            lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
            raise SubmitError(lines[-1] if lines else "sbatch failed without a message") from exc
        return str(job.job_id)
