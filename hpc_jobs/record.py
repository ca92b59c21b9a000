"""The typed stage entries of ``run.json``: every module reads and writes stages through these.

A :class:`StageRecord` is one stage of a run as planned and as submitted: what it runs (entry,
resources, inputs, outputs, array size), and what became of it (state, Slurm jobs, attempts,
times). A :class:`JobRecord` is one ``sbatch`` of it: a plain job, or an array job that runs some
of the stage's tasks (all of them at launch; only the unfinished ones after a ``resume``).

Array task ``t`` of a stage runs as Slurm array index ``t - offset`` of the job that holds it, so
its Slurm id is ``JOBID_<t - offset>``; ``StageRecord.task_job`` maps each task to the Slurm id of
its newest submission, so a task that completed in an earlier submission keeps its own id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


def compress_indices(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8`` (Slurm's ``--array`` syntax)."""
    out: List[str] = []
    values = sorted(set(indices))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


def expand_indices(spec: str) -> List[int]:
    """``0-2,5%2`` -> ``[0, 1, 2, 5]`` (the throttle is dropped)."""
    out: List[int] = []
    for part in str(spec).split("%")[0].split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def task_chunks(tasks: Sequence[int], max_array: int) -> List[Tuple[int, List[int]]]:
    """``(offset, tasks)`` per array job for a set of task indices: every Slurm index
    ``task - offset`` stays below MaxArraySize. All tasks below it: one job, offset 0, so a
    resubmitted task keeps its index (``--array=1,5``) and aftercorr edges line up."""
    ordered = sorted(set(tasks))
    if not ordered:
        return []
    limit = max(1, max_array - 1)
    if ordered[-1] < limit:
        return [(0, ordered)]
    out: List[Tuple[int, List[int]]] = []
    for task in ordered:
        if out and task - out[-1][0] < limit:
            out[-1][1].append(task)
        else:
            out.append((task, [task]))
    return out


def array_directive(tasks: Sequence[int], offset: int, parallelism: Optional[int]) -> str:
    """The ``--array`` value of one array job: its tasks' Slurm indices, and the ``%N`` throttle."""
    spec = compress_indices([t - offset for t in tasks])
    return spec + (f"%{parallelism}" if parallelism else "")


@dataclass
class JobRecord:
    """One submission (``sbatch``) of a stage: a job, or an array job over ``tasks``."""

    job_id: str
    script: str = ""
    array: Optional[str] = None  # the --array spec of this submission ("0-6%2", "1,5")
    tasks: List[int] = field(default_factory=list)  # the stage's task indices it runs
    offset: int = 0  # Slurm array index = task - offset

    def slurm_id(self, task: int) -> str:
        return f"{self.job_id}_{task - self.offset}"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "JobRecord":
        job = cls(job_id=str(data["job_id"]), script=data.get("script", ""), array=data.get("array"),
                  tasks=[int(t) for t in data.get("tasks", [])], offset=int(data.get("offset", 0) or 0))
        if job.array and not job.tasks:  # a record written before tasks were kept
            first = int(data.get("first_task", 0) or 0)
            job.tasks = [first + i for i in expand_indices(job.array)]
            job.offset = first
        return job


@dataclass
class StageRecord:
    """One stage of a run, as recorded in ``run.json``."""

    name: str
    entry: str = ""  # module:function
    where: str = "batch"  # login | process | batch
    depends_on: List[str] = field(default_factory=list)
    array: Optional[int] = None  # number of tasks; None = a plain job
    array_parallelism: Optional[int] = None  # at most this many tasks at once (Slurm's %K)
    resources: Dict[str, Any] = field(default_factory=dict)
    inputs: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> Input as a dict
    outputs: Dict[str, Any] = field(default_factory=dict)  # name -> path, or a BestCheckpoint dict
    kind: str = "cpu"
    # what became of it
    state: str = "PLANNED"
    jobs: List[JobRecord] = field(default_factory=list)  # the newest submission's jobs
    task_job: Dict[str, str] = field(default_factory=dict)  # task -> Slurm id of its newest submission
    task_state: Dict[str, str] = field(default_factory=dict)  # task -> state (local backend, launch-time)
    attempts: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)  # {submitted, job_ids, tasks}
    script: Optional[str] = None
    job_templates: List[Dict[str, Any]] = field(default_factory=list)
    started: Optional[float] = None
    ended: Optional[float] = None
    exit_code: Optional[int] = None
    reason: str = ""
    job_id: Optional[str] = None  # an interactive (debug) allocation
    debug: bool = False
    reused_from: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    # -- derived ---------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.array or 1

    @property
    def is_array(self) -> bool:
        return bool(self.array)

    @property
    def task_indices(self) -> List[Optional[int]]:
        return list(range(self.array)) if self.array else [None]

    @property
    def world_size(self) -> int:
        res = self.resources
        return int(res.get("nodes", 1)) * self.ranks_per_node

    @property
    def ranks_per_node(self) -> int:
        res = self.resources
        return int(res.get("tasks_per_node") or max(1, int(res.get("gpus_per_node", 0) or 0)))

    @property
    def time_limit(self) -> str:
        return str(self.resources.get("time", "01:00:00"))

    def per_task_parents(self) -> List[str]:
        return [i["stage"] for i in self.inputs.values() if i.get("per_task")]

    def job_ids(self) -> List[str]:
        return [j.job_id for j in self.jobs]

    def slurm_ids(self) -> List[str]:
        """The Slurm id of every task's newest submission (``123`` for a plain job)."""
        if not self.array:
            return [self.jobs[0].job_id] if self.jobs else []
        return [self.task_job[str(t)] for t in range(self.array) if str(t) in self.task_job]

    def slurm_id(self, task: Optional[int]) -> Optional[str]:
        if task is None or not self.array:
            return self.jobs[0].job_id if self.jobs else None
        return self.task_job.get(str(task))

    def job_for_task(self, task: Optional[int]) -> Optional[JobRecord]:
        """The job (of the newest submission that ran it) holding ``task``."""
        if not self.jobs:
            return None
        if task is None or not self.array:
            return self.jobs[0]
        for job in self.jobs:
            if task in job.tasks:
                return job
        sid = self.task_job.get(str(task))
        if sid:  # submitted in an earlier submission: rebuild its job from the id
            base, index = sid.split("_", 1)
            return JobRecord(job_id=base, tasks=[task], offset=task - int(index))
        return None

    def record_submission(self, jobs: List[JobRecord], when: float) -> None:
        self.jobs = jobs
        for job in jobs:
            for task in job.tasks:
                self.task_job[str(task)] = job.slurm_id(task)
        self.attempts += 1
        self.state = "SUBMITTED"
        self.history.append({"submitted": when, "job_ids": [j.job_id for j in jobs],
                             "tasks": [t for j in jobs for t in j.tasks] if self.array else None})

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "jobs")}
        out["jobs"] = [j.to_dict() for j in self.jobs]
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "StageRecord":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "jobs"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "jobs"}
        rec = cls(**known, extra=extra)
        rec.jobs = [JobRecord.from_dict(j) for j in data.get("jobs", [])]
        if rec.array and rec.jobs and not rec.task_job:
            for job in rec.jobs:
                for task in job.tasks:
                    rec.task_job[str(task)] = job.slurm_id(task)
        return rec
