"""What a run is doing: the shared scheduler poller's answer merged with the stages' own files.

The scheduler's answer is the base while it knows a job; every read goes through
:mod:`hpc_jobs.poller` (one cached call for all of a user's jobs). When the scheduler does not know
a job (no accounting, or it left ``squeue`` after MinJobAge), the marker the stage wrote
(``state[.<task>].json``, with its job id) tells how it ended; a job neither knows is UNKNOWN,
never assumed dead. A marker newer than the cached answer saying the stage started or was requeued
is shown as it is, and one saying it ended makes the read urgent: the jobs report their own
changes, so a healthy run needs the scheduler only every 600 s (:func:`stage_states`).

Each stage also gets its progress (``heartbeat.json``: step/total_steps, eta_s, loss; flagged
``stale`` when older than ``HPC_JOBS_STALE_MIN`` minutes, default 10, while RUNNING), its last
metric, and when it failed: the last lines of its error log and a one-line hint
(:mod:`hpc_jobs.triage`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import states as statesmod
from .errors import UserError
from .ledger import Run
from .record import JobRecord, StageRecord
from .runtime import ALIVE_EVERY_S, alive_path, marker_path, read_marker, task_dir

FAILED_LIKE = statesmod.FAILED
ACTIVE_LIKE = statesmod.ACTIVE
STALE_AFTER_S = 600.0
TAIL_LINES = 15


@dataclass
class TaskState:
    """One task of an array stage (``status RUN STAGE`` lists them)."""

    index: int
    state: str
    job_id: str = ""  # JOBID_i of its newest submission
    node: str = ""
    elapsed: str = ""
    exit_code: str = ""
    raw_state: str = ""
    reason: str = ""
    error: str = ""
    progress: Optional[Dict[str, Any]] = None
    metric: str = ""  # the last metric
    best: str = ""  # the best validation metric so far: "val_corr=0.31 @120"
    result: Any = None

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StageState:
    name: str
    state: str
    job_ids: List[str] = field(default_factory=list)
    elapsed: str = ""
    exit_code: str = ""
    node: str = ""
    reason: str = ""
    error: str = ""
    result: Any = None
    progress: Optional[Dict[str, Any]] = None
    tasks: Dict[str, str] = field(default_factory=dict)  # task -> state, for arrays
    task_list: List[TaskState] = field(default_factory=list)  # every task of an array, in order
    raw_state: str = ""  # Slurm's own words ("CANCELLED by 0", "OUT_OF_MEMORY")
    where: str = ""
    metric: str = ""  # the last metric: "loss=0.12" / "val spearman=0.91"
    hint: Optional[Dict[str, str]] = None  # {cause, hint, evidence} when it failed
    log_tail: List[str] = field(default_factory=list)  # last lines of the error log, when it failed
    log_file: str = ""
    # every attempt that did not complete: {job_id, attempt, task, cause, step} (runtime.read_attempts)
    interruptions: List[Dict[str, Any]] = field(default_factory=list)
    # how the stage starts from another's checkpoint: "resume train_v83" / "init train_v98" ("": none)
    handoff: str = ""

    def as_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "task_list"}
        out["task_list"] = [t.as_dict() for t in self.task_list]
        return out

    @property
    def task_counts(self) -> str:
        """``7 tasks: 5 COMPLETED, 2 RUNNING`` ("" for a plain job)."""
        return statesmod.counts_text(t.state for t in self.task_list) if self.task_list else ""


def _safe_marker(stage_dir: Path, task: Optional[int]) -> Optional[Dict[str, Any]]:
    try:
        marker = read_marker(stage_dir, task)
    except (ValueError, OSError):
        return None  # half-written on a file system without atomic rename: read it next time
    return marker if isinstance(marker, dict) else None


def _marker_state(stage_dir: Path, task: Optional[int], job_id: Optional[str],
                  marker: Any = False) -> Optional[Dict[str, Any]]:
    """The task's marker when it belongs to ``job_id`` (``marker``: already read; False: read it)."""
    marker = _safe_marker(stage_dir, task) if marker is False else marker
    if not marker:
        return None
    if job_id is not None and marker.get("job_id") not in (None, job_id.split("_")[0], job_id):
        return None  # a marker from an earlier attempt
    return marker


# -- progress ------------------------------------------------------------------------------------
def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            return None
        return out if math.isfinite(out) else None
    return None


def stale_after_s() -> float:
    try:
        return float(os.environ.get("HPC_JOBS_STALE_MIN", "")) * 60
    except ValueError:
        return STALE_AFTER_S


def parse_heartbeat(text: Optional[str], state: str = "", now: Optional[float] = None,
                    stale_s: Optional[float] = None, started: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """``heartbeat.json``'s text -> its fields plus ``fraction``, ``age_s``, ``stale``. Never raises:
    a missing file gives None; a partial or garbled one ``{"unreadable": True}``; fields of the
    wrong type are ignored. A heartbeat older than ``stale_s`` while the stage is RUNNING is stale.
    Without ``eta_s`` the ETA comes from ``rate``, else from the pace since ``started`` (epoch s)."""
    if text is None:
        return None
    now = time.time() if now is None else now
    stale_s = stale_after_s() if stale_s is None else stale_s
    try:
        data = json.loads(text)
    except ValueError:
        return {"unreadable": True, "stale": False}
    if not isinstance(data, dict):
        return {"unreadable": True, "stale": False}
    out: Dict[str, Any] = dict(data)
    step, total = _num(data.get("step")), _num(data.get("total_steps", data.get("total")))
    if step is not None and total and total > 0:
        out["fraction"] = max(0.0, min(1.0, step / total))
    else:
        out["fraction"] = None
    eta = _num(data.get("eta_s"))
    rate = _num(data.get("rate"))
    if eta is None and rate and rate > 0 and step is not None and total:
        eta = max(0.0, (total - step) / rate)
    when = _num(data.get("time"))
    if eta is None and started and when and step and step > 0 and total and when > started:
        eta = max(0.0, (total - step) * (when - started) / step)  # data prep: the pace so far
    age = max(0.0, now - when) if when is not None else None
    if eta is not None and age is not None and state == "RUNNING":
        eta = max(0.0, eta - age)  # the ETA was written ``age`` seconds ago
    out["eta_s"] = eta
    out["age_s"] = round(age, 1) if age is not None else None
    out["stale"] = bool(state == "RUNNING" and age is not None and age > stale_s)
    return out


def read_progress(stage_dir: Path, state: str, now: Optional[float] = None,
                  started: Optional[float] = None) -> Optional[Dict[str, Any]]:
    try:
        text = (stage_dir / "heartbeat.json").read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return {"unreadable": True, "stale": False}
    return parse_heartbeat(text, state, now, started=started)


def _started(stage_dir: Path, rec: StageRecord, task: Optional[int] = None, marker: Any = False) -> Optional[float]:
    """When the task's current attempt started (its marker, else run.json), as epoch seconds
    (``marker``: already read; False: read it)."""
    import datetime as _dt

    marker = _safe_marker(stage_dir, task) if marker is False else marker
    if marker and marker.get("started"):
        try:
            return _dt.datetime.fromisoformat(str(marker["started"])).timestamp()
        except ValueError:
            pass
    return float(rec.started) if isinstance(rec.started, (int, float)) else None


def best_metric(out_dir: Path, rec: Optional[StageRecord] = None) -> str:
    """The best validation metric a training task has reached: by the stage's BestCheckpoint
    output when it declares one, else as the engine records it in its checkpoints' manifests
    (``val_corr=0.312 @120``); "" when none."""
    from .fsutil import read_json

    for out in (rec.outputs.values() if rec else ()):
        if isinstance(out, dict) and "best_of" in out:
            from .checkpoint import best_complete

            found = best_complete(out_dir / out["best_of"], out["metric"], out["mode"], quick=True)
            if found:
                return f"{out['metric']}={found[1].metrics[out['metric']]:.4g} @{found[1].step}"

    try:
        manifest = read_json(out_dir / "checkpoints" / "last.pt.manifest.json")
    except (ValueError, OSError):
        return ""
    best = ((manifest or {}).get("meta") or {}).get("best") if isinstance(manifest, dict) else None
    if isinstance(best, dict) and _num(best.get("value")) is not None:
        return f"{best.get('metric')}={_num(best['value']):.4g} @{best.get('step', '?')}"
    return ""


def last_metric(stage_dir: Path, progress: Optional[Dict[str, Any]] = None) -> str:
    """The newest validation metrics of ``metrics.csv`` (else the newest train loss, else the
    heartbeat's loss): a short ``name=value`` string."""
    path = stage_dir / "metrics.csv"
    try:
        with open(path, "rb") as fh:
            header = fh.readline().decode(errors="replace").strip()
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            tail = fh.read().decode(errors="replace").splitlines()
    except OSError:
        tail, header = [], ""
    if header and tail:
        if size > 16384:
            tail = tail[1:]  # the first line may be cut
        names = next(csv.reader([header]))
        rows = [dict(zip(names, r)) for r in csv.reader(io.StringIO("\n".join(l for l in tail if l and l != header)))]
        for split in ("val", "train"):
            picked = [r for r in rows if r.get("split") == split]
            if picked:
                row = picked[-1]
                parts = []
                for key in names[3:]:
                    value = _num(row.get(key))
                    if value is not None:
                        parts.append(f"{key}={value:.4g}")
                if parts:
                    return (f"{split} " if split == "val" else "") + " ".join(parts[:3]) + f" @{row.get('step', '?')}"
    if progress and _num(progress.get("loss")) is not None:
        return f"loss={_num(progress['loss']):.4g}"
    return ""


# -- logs ----------------------------------------------------------------------------------------
ATTEMPT_MARKERS = ("Starting with JobEnvironment", "[hpc_jobs] attempt")


def tail_lines(path: Path, n: int = TAIL_LINES, max_bytes: int = 65536) -> List[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    if size > max_bytes:
        lines = lines[1:]
    return [l for l in lines if l.strip()][-n:]


def _slurm_log(stage_dir: Path, job: JobRecord, array: bool, task: Optional[int], rank: int,
               suffix: str, job_id: Optional[str] = None) -> Path:
    jid = job_id or job.job_id
    folder = stage_dir / "slurm"
    if array:
        return folder / f"{jid}_{(task or 0) - job.offset}_{rank}_log{suffix}"
    return folder / f"{jid}_{rank}_log{suffix}"


def log_files(run: Run, stage: str, task: Optional[int] = None, rank: int = 0) -> List[Path]:
    """The log files of a stage's current submission, stdout before stderr (existing ones only).
    Array stages without ``task``: every task's files."""
    rec = run.stage(stage)
    stage_dir = run.stage_dir(stage)
    files: List[Path] = []
    if rec.where == "batch" and run.backend == "slurm" and not rec.debug:
        tasks = [task] if task is not None or not rec.array else list(range(rec.num_tasks))
        for t in tasks:
            job = rec.job_for_task(t)
            if job is None:
                continue
            base = _slurm_log(stage_dir, job, rec.is_array, t, rank, "")
            for suffix in (".out", ".err"):
                path = base.with_name(base.name + suffix)
                if path.exists():
                    files.append(path)
    else:
        local = stage_dir / "local"
        prefix = f"task{task}." if task is not None else ("task*." if rec.array else "")
        files += sorted(local.glob(f"{prefix}rank{rank}.log"), key=_natural)
        if rec.debug:
            files += sorted((stage_dir / "debug").glob("*.log"), key=_natural)
    return files


def _natural(path: Path) -> Tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


@dataclass
class Attempt:
    number: int  # 1-based, over every submission and requeue of the stage
    job_id: str
    files: List[Path]
    ranges: Dict[str, Tuple[int, Optional[int]]]  # file -> (start byte, end byte or None = to the end)
    how: str  # "submitted", "requeued", "resubmitted (resume)"


def _segments(path: Path) -> List[int]:
    """Byte offsets where an attempt starts in a log file (submitit's start line, or hpc-jobs' banner)."""
    found: Dict[str, List[int]] = {m: [] for m in ATTEMPT_MARKERS}
    try:
        with open(path, "rb") as fh:
            offset = 0
            for line in fh:
                text = line.decode(errors="replace")
                for marker in ATTEMPT_MARKERS:
                    if marker in text:
                        found[marker].append(offset)
                offset += len(line)
    except OSError:
        return []
    # one attempt prints both submitit's start line and the banner: count by the first kind found
    return next((starts for starts in found.values() if starts), [])


def log_attempts(run: Run, stage: str, task: Optional[int] = None, rank: int = 0) -> List[Attempt]:
    """Every attempt of a (Slurm) stage task, oldest first. A resume submits a new job (new files);
    a requeue appends to the same files: its boundaries are submitit's "Starting with
    JobEnvironment" lines in the .err file (and an ``[hpc_jobs] attempt`` banner where the stage
    prints one). Without a boundary in the .out file, every attempt of one job shows all of it."""
    rec = run.stage(stage)
    stage_dir = run.stage_dir(stage)
    array = rec.is_array
    history = rec.history or ([{"job_ids": rec.job_ids()}] if rec.jobs else [])
    current = rec.job_for_task(task)
    attempts: List[Attempt] = []
    for n_sub, sub in enumerate(history):
        ids = [str(j) for j in sub.get("job_ids", [])]
        if not ids:
            continue
        if array and sub.get("tasks") is not None and task is not None and task not in sub["tasks"]:
            continue  # a resume that did not rerun this task
        if array and current is not None and current.job_id in ids:
            jid = current.job_id
        else:
            jid = ids[0]
        ref = current or JobRecord(job_id=jid)
        if array and jid != ref.job_id:
            ref = JobRecord(job_id=jid, tasks=ref.tasks, offset=ref.offset)
        out = _slurm_log(stage_dir, ref, array, task, rank, ".out", jid)
        err = _slurm_log(stage_dir, ref, array, task, rank, ".err", jid)
        files = [p for p in (out, err) if p.exists()]
        if not files:
            continue
        out_starts, err_starts = _segments(out), _segments(err)
        primary = err_starts or out_starts or [0]  # submitit logs its start line to one of them
        n = len(primary)
        for k in range(n):
            ranges: Dict[str, Tuple[int, Optional[int]]] = {}
            for path, starts in ((out, out_starts), (err, err_starts)):
                if not path.exists():
                    continue
                if len(starts) == n:  # what precedes the first start line belongs to the first attempt
                    ranges[str(path)] = (0 if k == 0 else starts[k], starts[k + 1] if k + 1 < n else None)
                else:
                    ranges[str(path)] = (0, None)
            how = "submitted" if n_sub == 0 and k == 0 else ("requeued" if k > 0 else "resubmitted (resume)")
            attempts.append(Attempt(len(attempts) + 1, jid, files, ranges, how))
    return attempts


def read_range(path: Path, rng: Tuple[int, Optional[int]]) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(rng[0])
            data = fh.read() if rng[1] is None else fh.read(max(0, rng[1] - rng[0]))
    except OSError:
        return ""
    return data.decode(errors="replace")


def _error_log(run: Run, name: str, rec: StageRecord, st: StageState) -> Optional[Path]:
    """The file whose tail explains a failure: rank 0's stderr of the (first failed) task."""
    stage_dir = run.stage_dir(name)
    task = None
    if rec.array:
        bad = [t.index for t in st.task_list if t.state in statesmod.FAILED and t.state != "CANCELLED"] or \
              [t.index for t in st.task_list if t.state != "COMPLETED"]
        task = bad[0] if bad else 0
    if rec.where == "batch" and run.backend == "slurm" and rec.jobs:
        job = rec.job_for_task(task)
        if job is None:
            return None
        path = _slurm_log(stage_dir, job, rec.is_array, task, 0, ".err")
        return path if path.exists() else None
    local = stage_dir / "local" / (f"task{task}.rank0.log" if task is not None else "rank0.log")
    if local.exists():
        return local
    debug = sorted((stage_dir / "debug").glob("*.log"))
    return debug[-1] if debug else None


# -- the merge -----------------------------------------------------------------------------------
def run_job_ids(run: Run) -> List[str]:
    if run.backend != "slurm":
        return []
    return [i for rec in run.stages.values() if rec.where == "batch" for i in rec.slurm_ids()]


def stage_states(run: Run, triage: bool = True, now: Optional[float] = None, fresh: bool = False) -> Dict[str, StageState]:
    """Every stage's state, progress, last metric and (``triage``) failure hint. ``fresh``: an
    answer at most the poller's minimum interval old (for decisions such as resume).

    The jobs report themselves: a job's start, end, failure and requeue are in its marker the
    moment they happen; a start or requeue newer than the scheduler's answer is shown as it is. So
    the poller is asked ``quiet`` (its answer may be up to 600 s old: what only the scheduler can
    tell is a change from outside, an admin's scancel or a job that died before it could write)
    unless some job needs the scheduler sooner: one that reported its end since the answer (asked
    now, urgent: its state, exit code and what Slurm does to its dependents follow), one it runs
    that has not reported itself (starting, or silent), one past its time limit, one that ended
    per its marker before a newer answer that still runs it, or a queued one whose parent stage
    failed (Slurm cancels such dependents, which no job reports); then the poller's normal 2-30 s
    interval applies."""
    from . import poller, slurm

    run.reload()
    ids = run_job_ids(run)
    use_sched = bool(ids) and slurm.available()
    snap = poller.query(ids, urgent=fresh, quiet=not fresh) if use_sched else poller.Snapshot({})
    out, need = _merge(run, snap, triage, now)
    if need and use_sched and not snap.called and not fresh:
        again = poller.query(ids, urgent=need >= URGENT)
        if again.called:
            out, _ = _merge(run, again, triage, now)
    return out


#: what a job writes into its marker itself (hpc_jobs/runtime.py) and status shows as it is when newer
#: than the scheduler's answer: its start and its requeue. Its end (COMPLETED, FAILED) is shown once
#: the scheduler has it too (Slurm starts or cancels the dependents then, and has the exit code): the
#: end makes the read urgent instead
SELF_REPORTED = ("RUNNING", "REQUEUED")
#: what a task needs of the scheduler: nothing before the quiet interval, the normal interval, now
QUIET, LOUD, URGENT = 0, 1, 2


def _task_from_scheduler(rec: StageRecord, stage_dir: Path, task: Optional[int], snap, answered_at: float,
                         ts: TaskState, now: float, files: bool = True, raw_marker: Any = False) -> int:
    """Fill ``ts`` from the scheduler's answer and the task's marker (a start or requeue it reported
    since the answer is shown as reported); return what it needs of the scheduler: URGENT when it
    reported its end since the answer that still has it active, LOUD when it runs per the answer
    without a marker of its own (starting, or silent), went silent after its start, or ended per
    its marker before a newer answer that still runs it, else QUIET."""
    from .slurm import ACTIVE_STATES, format_elapsed

    tid = rec.slurm_id(task)
    ts.job_id = tid or ""
    info = snap.get(tid) if tid else None
    marker = _marker_state(stage_dir, task, tid, raw_marker) if files else None  # files: its directory exists
    mstate = marker.get("state") if marker else None
    newer = mstate is not None and _newer(stage_dir, task, answered_at)
    reported = mstate in SELF_REPORTED and newer
    known = info is not None and info.state != "UNKNOWN"
    # its end, per its marker, while the answer still has it active: Slurm's own end follows (and
    # what it does to the dependents, the exit code): asked now when reported since the answer
    ended = known and info.state in ACTIVE_STATES and mstate in ("COMPLETED", "FAILED")
    loud = known and ((info.state == "RUNNING" and marker is None) or (ended and not newer))
    # a job that said it runs and then went silent, or ran past its time limit (Slurm kills it
    # KillWait seconds after SIGTERM, often before it can write its end): only the scheduler knows
    loud = loud or (mstate == "RUNNING" and known and info.state in ACTIVE_STATES
                    and (_silent(stage_dir, task, now) or _past_limit(rec, stage_dir, task, marker, now)))
    need = URGENT if ended and newer else LOUD if loud else QUIET
    if known and not reported:
        ts.state = info.state
        ts.elapsed, ts.node = info.elapsed, info.node if info.node not in ("None assigned",) else ""
        ts.reason = info.reason if info.state == "PENDING" and info.reason not in ("None", "") else ""
        ts.exit_code, ts.raw_state = info.exit_code, info.raw_state
    elif marker and (reported or mstate in ("COMPLETED", "FAILED")):
        ts.state = mstate
        ts.raw_state = f"{ts.state} (marker)"
        if marker.get("elapsed_s") is not None:
            ts.elapsed = format_elapsed(float(marker["elapsed_s"]))
        elif mstate == "RUNNING":
            started = _started(stage_dir, rec, task, marker)
            ts.elapsed = format_elapsed(max(0.0, now - started)) if started else ""
        ts.node = str(marker.get("host") or "")
    elif tid is None:
        ts.state = rec.task_state.get(str(task), rec.state if rec.state in statesmod.PLANNED else "UNKNOWN")
    elif info is None and tid.split("_")[0] in snap.pending:
        ts.state = "SUBMITTED"  # not asked about yet (just submitted)
    else:
        ts.state = "UNKNOWN"
    if marker and marker.get("error"):
        ts.error = marker["error"]
    if marker and "result" in marker and ts.state == "COMPLETED":
        ts.result = marker["result"]
    if ts.state in ("PENDING", "SUBMITTED"):
        ts.elapsed, ts.exit_code = "", ""
    return need


def _task_here(rec: StageRecord, stage_dir: Path, task: Optional[int], now: float, ts: TaskState) -> None:
    """A task run on this machine (launch-time stages, the local backend): its marker tells."""
    marker = _safe_marker(stage_dir, task)
    recorded = rec.task_state.get(str(task))
    if marker and marker.get("state") and not (recorded == "CANCELLED"):
        ts.state = marker["state"]
        if ts.state == "RUNNING" and rec.state not in statesmod.ACTIVE:
            ts.state = recorded or "FAILED"  # the process running it is gone
    else:
        ts.state = recorded or (rec.state if not rec.array else "PLANNED")
    if marker:
        ts.error = marker.get("error", "") or ""
        ts.result = marker.get("result")
        ts.node = str(marker.get("host") or "")
        if marker.get("elapsed_s") is not None:
            ts.elapsed = _fmt_elapsed(float(marker["elapsed_s"]))


def _merge(run: Run, snap, triage: bool, now: Optional[float]) -> Tuple[Dict[str, StageState], int]:
    now = time.time() if now is None else now
    answered_at = now - snap.age_s if snap.age_s != float("inf") else 0.0
    out: Dict[str, StageState] = {}
    need = QUIET
    for rec in run.in_order():
        name = rec.name
        stage_dir = run.stage_dir(name)
        st = StageState(name=name, state=rec.state, where=rec.where)
        scheduled = rec.where == "batch" and run.backend == "slurm" and bool(rec.jobs)
        tasks: List[TaskState] = []
        present = _task_dirs(stage_dir) if rec.array else None
        for task in rec.task_indices:
            ts = TaskState(index=task if task is not None else 0, state="UNKNOWN")
            # an array task without a directory has written nothing yet (pending): no file to read
            files = present is None or task is None or str(task) in present
            marker = _safe_marker(stage_dir, task) if files else None  # read once per task
            if scheduled:
                need = max(need, _task_from_scheduler(rec, stage_dir, task, snap, answered_at, ts, now, files, marker))
            else:
                _task_here(rec, stage_dir, task, now, ts)
            if not files:
                tasks.append(ts)
                continue
            where = task_dir(stage_dir, task)
            ts.progress = read_progress(where, ts.state, now, _started(stage_dir, rec, task, marker))
            if ts.state in ("RUNNING", "COMPLETED", *FAILED_LIKE):
                ts.metric = last_metric(where, ts.progress)
                ts.best = best_metric(where, rec) if ts.state in ("RUNNING", "COMPLETED") else ""
            tasks.append(ts)
        st.state = statesmod.aggregate(t.state for t in tasks) if (scheduled or rec.array) else tasks[0].state
        if not scheduled and not rec.array:
            st.state = tasks[0].state if rec.state not in statesmod.PLANNED else rec.state
        if rec.array:
            st.task_list = tasks
            st.tasks = {str(t.index): t.state for t in tasks}
        # the stage's row: a running task's place, the slowest task's progress, the first error
        lead = _lead_task(tasks)
        st.job_ids = rec.job_ids() if scheduled else ([rec.job_id] if rec.job_id else [])
        st.elapsed, st.node, st.exit_code, st.raw_state = lead.elapsed, lead.node, lead.exit_code, lead.raw_state
        if not scheduled and rec.started and not rec.array:
            st.elapsed = _fmt_elapsed((rec.ended or now) - rec.started) if rec.state not in statesmod.PLANNED else ""
        if not scheduled and rec.exit_code is not None:
            st.exit_code = str(rec.exit_code)
        st.reason = next((t.reason for t in tasks if t.reason), "") or rec.reason
        st.error = next((t.error for t in tasks if t.error), "")
        st.result = tasks[0].result if not rec.array else next((t.result for t in tasks if t.result is not None), None)
        st.progress, st.metric = lead.progress, lead.metric
        st.interruptions = interruptions(stage_dir, rec, present)
        st.handoff = ", ".join(f"{i['kind']} {i['stage']}" + ("[task]" if i.get("per_task") else "")
                               for i in rec.inputs.values() if i.get("kind") in ("init", "resume"))
        out[name] = st
    _cancelled_upstream(run, out)
    if _doomed(run, out):
        need = max(need, LOUD)
    if triage:
        _triage(run, out)
    return out, need


def _doomed(run: Run, out: Dict[str, StageState]) -> bool:
    """A queued job whose parent stage failed: Slurm cancels it (kill-on-invalid-dep) at its own
    pace and nobody reports that, so the scheduler is asked at the normal interval until it has."""
    for name, st in out.items():
        tasks = st.task_list or [st]
        if not any(t.state in ("PENDING", "SUBMITTED") for t in tasks):
            continue
        for parent in run.stage(name).depends_on:
            pst = out.get(parent)
            if pst is not None and (pst.state in FAILED_LIKE or any(t.state in FAILED_LIKE for t in pst.task_list)):
                return True
    return False


def _lead_task(tasks: List[TaskState]) -> TaskState:
    """The task a stage's row shows: the slowest running one, else the first not completed."""
    running = [t for t in tasks if t.state == "RUNNING"]
    if running:
        return min(running, key=lambda t: (t.progress or {}).get("fraction") or 0.0)
    return next((t for t in tasks if t.state != "COMPLETED"), tasks[0])


def _task_dirs(stage_dir: Path) -> Optional[set]:
    """The names in an array stage's ``tasks/`` (one directory per task that has started); None
    when it cannot be listed (then every task's files are read)."""
    try:
        return set(os.listdir(stage_dir / "tasks"))
    except FileNotFoundError:
        return set()
    except OSError:
        return None


def interruptions(stage_dir: Path, rec: StageRecord, present: Optional[set] = None) -> List[Dict[str, Any]]:
    """The attempts of a stage that ended without completing, oldest first, each with its cause:
    PREEMPTED, TIMEOUT, REQUEUED (a requeue signal), NODE_FAIL, CANCELLED, FAILED (a crash)...
    ``present``: the array's task directories (:func:`_task_dirs`); the others have no log."""
    from .runtime import read_attempts

    out: List[Dict[str, Any]] = []
    for task in rec.task_indices:
        if present is not None and task is not None and str(task) not in present:
            continue
        last: Dict[Tuple[Any, Any], Dict[str, Any]] = {}
        for e in read_attempts(stage_dir, task):
            if e.get("event") == "end":
                last[(e.get("job_id"), e.get("attempt"))] = e
        for (job_id, attempt), e in last.items():
            if e.get("state") != "COMPLETED":
                out.append({"job_id": job_id, "attempt": attempt, "task": task, "cause": e.get("cause"),
                            "step": e.get("step"), "time": e.get("time")})
    return sorted(out, key=lambda i: i.get("time") or 0)


def _cancelled_upstream(run: Run, out: Dict[str, StageState]) -> None:
    """A batch stage that the scheduler has forgotten (no accounting, MinJobAge passed), that never
    started (no marker) and whose parent did not complete was cancelled by Slurm
    (--kill-on-invalid-dep): report that, not UNKNOWN, so nothing waits for it forever."""
    for name in run.record.get("order", []):
        st = out.get(name)
        if st is None or st.state != "UNKNOWN" or any(run.stage_dir(name).glob("**/state.json")):
            continue
        bad = [p for p in run.stage(name).depends_on if p in out and out[p].state in FAILED_LIKE]
        if bad:
            st.state = "CANCELLED"
            st.reason = f"upstream stage {bad[0]} ended {out[bad[0]].state}: DependencyNeverSatisfied"


#: a RUNNING job whose ``alive`` file is older than this has stopped reporting itself
ALIVE_STALE_S = 3 * ALIVE_EVERY_S


def _silent(stage_dir: Path, task: Optional[int], now: float) -> bool:
    """The task's marker says RUNNING but its rank 0 stopped touching ``alive`` (killed from
    outside, its node gone). Without the file (a job of an older hpc-jobs, or one that could not
    write it), the marker's own age stands in."""
    for path in (alive_path(stage_dir, task), marker_path(stage_dir, task)):
        try:
            return now - path.stat().st_mtime > ALIVE_STALE_S
        except OSError:
            continue
    return True


def _past_limit(rec: StageRecord, stage_dir: Path, task: Optional[int], marker: Any, now: float) -> bool:
    """The task's current attempt has run longer than the stage's time limit: it is ending (TIMEOUT,
    or a requeue) whether or not it lives to say so."""
    from .spec import parse_time

    started = _started(stage_dir, rec, task, marker)
    try:
        return started is not None and now - started > parse_time(rec.time_limit)
    except UserError:  # a limit this hpc-jobs cannot read (a newer run.json): the alive rule alone
        return False


def _newer(stage_dir: Path, task: Optional[int], than: float) -> bool:
    try:
        return marker_path(stage_dir, task).stat().st_mtime > than
    except OSError:
        return False


def _triage(run: Run, states: Dict[str, StageState]) -> None:
    from .triage import Facts, diagnose

    root_failure: Dict[str, Optional[str]] = {}
    for name, st in states.items():
        rec = run.stage(name)
        upstream = None
        for parent in rec.depends_on:
            pst = states.get(parent)
            if pst is None:
                continue
            if root_failure.get(parent):
                upstream = root_failure[parent]
                break
            if pst.state in FAILED_LIKE or pst.state == "UNKNOWN" and parent in root_failure:
                upstream = parent
                break
        failed = st.state in FAILED_LIKE or (st.state == "UNKNOWN" and bool(st.error))
        if not failed:
            continue
        never_ran = st.state == "CANCELLED" and upstream is not None
        root_failure[name] = upstream if never_ran else name
        log = None if never_ran else _error_log(run, name, rec, st)
        if log is not None:
            st.log_file = str(log)
            st.log_tail = tail_lines(log)
        result = diagnose(Facts(state=st.state, raw_state=st.raw_state, exit_code=st.exit_code,
                                reason=st.reason or rec.reason, error=st.error, log_tail=st.log_tail,
                                upstream_failed=upstream if never_ran else None, run=run.id, stage=name))
        if result is not None:
            st.hint = result.as_dict()


def run_finished(states: Dict[str, StageState]) -> bool:
    """True when nothing is queued or running any more (and something was run)."""
    values = [s.state for s in states.values()]
    if any(v in ACTIVE_LIKE or v == "UNKNOWN" for v in values):
        return False
    if values and all(v == "PLANNED" for v in values):
        return False  # a launch that has not submitted yet
    return True


def _fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"


def cancel(run: Run, stages: Optional[List[str]] = None, task: Optional[int] = None) -> List[str]:
    """Cancel the jobs of a run (or of some stages; ``task``: only that task of one array stage)."""
    from . import poller, slurm

    run.reload()
    names = stages or run.order
    ids: List[str] = []
    for name in names:
        rec = run.stage(name)
        if task is not None:
            if not rec.array or not 0 <= task < rec.num_tasks:
                raise UserError(f"stage '{name}' has no task {task}: "
                                + (f"its tasks are 0-{rec.num_tasks - 1}" if rec.array else "it is not an array"))
            sid = rec.slurm_id(task)
            ids += [sid] if sid else []
        else:
            ids += rec.job_ids()
    if ids and run.backend == "slurm":
        slurm.cancel(ids)
        poller.invalidate()
    return ids
