"""What a run is doing: the shared scheduler poller's answer merged with the stages' own files.

The scheduler is the authority while it knows a job; every read goes through
:mod:`hpc_jobs.poller` (one cached call for all of a user's jobs). When the scheduler does not know
a job (no accounting, or it left ``squeue`` after MinJobAge), the marker the stage wrote
(``state[.<task>].json``, with its job id) tells how it ended; a job neither knows is UNKNOWN,
never assumed dead. When a marker is newer than the cached answer and disagrees with it (the stage
wrote COMPLETED, the cache still says RUNNING), the read asks the poller for an urgent refresh.

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

from .ledger import Run
from .runtime import marker_path, read_marker

FAILED_LIKE = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED")
ACTIVE_LIKE = ("PENDING", "RUNNING", "REQUEUED", "PREEMPTED", "SUBMITTED")
STALE_AFTER_S = 600.0
TAIL_LINES = 15


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
        return dict(self.__dict__)


def _aggregate(states: List[str]) -> str:
    if not states:
        return "UNKNOWN"
    if all(s == "COMPLETED" for s in states):
        return "COMPLETED"
    for active in ("RUNNING", "REQUEUED", "PREEMPTED", "PENDING", "SUBMITTED"):
        if active in states:
            return active
    for bad in ("OUT_OF_MEMORY", "NODE_FAIL", "TIMEOUT", "FAILED", "CANCELLED"):
        if bad in states:
            return bad
    return "UNKNOWN"


def _task_ids(entry: Dict[str, Any]) -> List[str]:
    ids: List[str] = []
    for job in entry.get("jobs", []):
        if entry.get("array"):
            ids += [f"{job['job_id']}_{i}" for i in range(_array_len(job["array"]))]
        else:
            ids.append(str(job["job_id"]))
    return ids


def _array_len(spec: str) -> int:
    rng = str(spec).split("%")[0]
    if "-" in rng:
        lo, hi = rng.split("-")
        return int(hi) - int(lo) + 1
    return 1


def _safe_marker(stage_dir: Path, task: Optional[int]) -> Optional[Dict[str, Any]]:
    try:
        marker = read_marker(stage_dir, task)
    except (ValueError, OSError):
        return None  # half-written on a file system without atomic rename: read it next time
    return marker if isinstance(marker, dict) else None


def _marker_state(stage_dir: Path, task: Optional[int], job_id: Optional[str]) -> Optional[Dict[str, Any]]:
    marker = _safe_marker(stage_dir, task)
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


def _started(stage_dir: Path, entry: Dict[str, Any]) -> Optional[float]:
    """When the stage's current attempt started (its marker, else run.json), as epoch seconds."""
    import datetime as _dt

    marker = _safe_marker(stage_dir, 0 if entry.get("array") else None)
    if marker and marker.get("started"):
        try:
            return _dt.datetime.fromisoformat(str(marker["started"])).timestamp()
        except ValueError:
            pass
    value = entry.get("started")
    return float(value) if isinstance(value, (int, float)) else None


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


def _slurm_log(stage_dir: Path, job: Dict[str, Any], array: bool, task: Optional[int], rank: int,
               suffix: str, job_id: Optional[str] = None) -> Path:
    jid = job_id or str(job["job_id"])
    folder = stage_dir / "slurm"
    if array:
        local = (task or 0) - int(job.get("first_task", 0) or 0)
        return folder / f"{jid}_{local}_{rank}_log{suffix}"
    return folder / f"{jid}_{rank}_log{suffix}"


def _job_for_task(entry: Dict[str, Any], task: Optional[int]) -> Optional[Dict[str, Any]]:
    jobs = entry.get("jobs", [])
    if not jobs:
        return None
    if not entry.get("array") or task is None:
        return jobs[0]
    for job in jobs:
        first = int(job.get("first_task", 0) or 0)
        if first <= task < first + _array_len(job.get("array", "0")):
            return job
    return jobs[-1]


def log_files(run: Run, stage: str, task: Optional[int] = None, rank: int = 0) -> List[Path]:
    """The log files of a stage's current submission, stdout before stderr (existing ones only).
    Array stages without ``task``: every task's files."""
    entry = run.stage(stage)
    stage_dir = run.stage_dir(stage)
    files: List[Path] = []
    if entry.get("where") == "batch" and run.record.get("backend") == "slurm" and not entry.get("debug"):
        folder = stage_dir / "slurm"
        for job in entry.get("jobs", []):
            jid = job["job_id"]
            if entry.get("array") and task is None:
                pattern = f"{jid}_*_{rank}_log"
            elif entry.get("array"):
                if _job_for_task(entry, task) is not job:
                    continue
                pattern = _slurm_log(stage_dir, job, True, task, rank, "").name
            else:
                pattern = f"{jid}_{rank}_log"
            for suffix in (".out", ".err"):
                files += sorted(folder.glob(pattern + suffix), key=_natural)
    else:
        local = stage_dir / "local"
        prefix = f"task{task}." if task is not None else ("task*." if entry.get("array") else "")
        files += sorted(local.glob(f"{prefix}rank{rank}.log"), key=_natural)
        if entry.get("debug"):
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
    starts: List[int] = []
    try:
        with open(path, "rb") as fh:
            offset = 0
            for line in fh:
                text = line.decode(errors="replace")
                if any(m in text for m in ATTEMPT_MARKERS):
                    starts.append(offset)
                offset += len(line)
    except OSError:
        return []
    return starts


def log_attempts(run: Run, stage: str, task: Optional[int] = None, rank: int = 0) -> List[Attempt]:
    """Every attempt of a (Slurm) stage task, oldest first. A resume submits a new job (new files);
    a requeue appends to the same files: its boundaries are submitit's "Starting with
    JobEnvironment" lines in the .err file (and an ``[hpc_jobs] attempt`` banner where the stage
    prints one). Without a boundary in the .out file, every attempt of one job shows all of it."""
    entry = run.stage(stage)
    stage_dir = run.stage_dir(stage)
    array = bool(entry.get("array"))
    history = entry.get("history") or ([{"job_ids": [j["job_id"] for j in entry.get("jobs", [])]}] if entry.get("jobs") else [])
    current = _job_for_task(entry, task)
    attempts: List[Attempt] = []
    for n_sub, sub in enumerate(history):
        ids = [str(j) for j in sub.get("job_ids", [])]
        if not ids:
            continue
        if array and current is not None:
            idx = entry.get("jobs", []).index(current) if current in entry.get("jobs", []) else 0
            jid = ids[min(idx, len(ids) - 1)]
        else:
            jid = ids[0]
        ref = current or {"job_id": jid}
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


def _error_log(run: Run, name: str, entry: Dict[str, Any], st: StageState) -> Optional[Path]:
    """The file whose tail explains a failure: rank 0's stderr of the (first failed) task."""
    stage_dir = run.stage_dir(name)
    task = None
    if entry.get("array"):
        bad = [int(t) for t, s in st.tasks.items() if s not in ("COMPLETED",)]
        task = bad[0] if bad else 0
    if entry.get("where") == "batch" and run.record.get("backend") == "slurm" and entry.get("jobs"):
        job = _job_for_task(entry, task)
        if job is None:
            return None
        path = _slurm_log(stage_dir, job, bool(entry.get("array")), task, 0, ".err")
        return path if path.exists() else None
    local = stage_dir / "local" / (f"task{task}.rank0.log" if task is not None else "rank0.log")
    if local.exists():
        return local
    debug = sorted((stage_dir / "debug").glob("*.log"))
    return debug[-1] if debug else None


# -- the merge -----------------------------------------------------------------------------------
def run_job_ids(run: Run) -> List[str]:
    stages = run.record.get("stages", {})
    if run.record.get("backend") != "slurm":
        return []
    return [i for entry in stages.values() if entry.get("where") == "batch" for i in _task_ids(entry)]


def stage_states(run: Run, triage: bool = True, now: Optional[float] = None, fresh: bool = False) -> Dict[str, StageState]:
    """Every stage's state, progress, last metric and (``triage``) failure hint. ``fresh``: an
    answer at most the poller's minimum interval old (for decisions such as resume)."""
    from . import poller, slurm

    run.reload()
    ids = run_job_ids(run)
    use_sched = bool(ids) and slurm.available()
    snap = poller.query(ids, urgent=fresh) if use_sched else poller.Snapshot({})
    out, disagree = _merge(run, snap, triage, now)
    if disagree and use_sched and not snap.called:
        urgent = poller.query(ids, urgent=True)
        if urgent.called:
            out, _ = _merge(run, urgent, triage, now)
    return out


def _merge(run: Run, snap, triage: bool, now: Optional[float]) -> Tuple[Dict[str, StageState], bool]:
    from .slurm import ACTIVE_STATES

    now = time.time() if now is None else now
    answered_at = now - snap.age_s if snap.age_s != float("inf") else 0.0
    stages = run.record.get("stages", {})
    out: Dict[str, StageState] = {}
    disagree = False
    for name in run.record.get("order", list(stages)):
        entry = stages[name]
        stage_dir = run.stage_dir(name)
        st = StageState(name=name, state=entry.get("state", "UNKNOWN"), where=entry.get("where", ""))
        if entry.get("where") == "batch" and run.record.get("backend") == "slurm" and entry.get("jobs"):
            task_ids = _task_ids(entry)
            st.job_ids = [str(j["job_id"]) for j in entry["jobs"]]
            states = []
            for n, tid in enumerate(task_ids):
                info = snap.get(tid)
                task = n if entry.get("array") else None
                marker = _marker_state(stage_dir, task, tid)
                if marker and info is not None and _newer(stage_dir, task, answered_at):
                    mstate = marker.get("state")
                    if (mstate in ("COMPLETED", "FAILED") and info.state in ACTIVE_STATES) or \
                            (mstate == "RUNNING" and info.state == "PENDING"):
                        disagree = True
                if info is not None and info.state != "UNKNOWN":
                    state = info.state
                    if state == "RUNNING" or not st.elapsed or n == 0:
                        st.elapsed, st.node = info.elapsed, info.node if info.node not in ("None assigned",) else ""
                    st.reason = info.reason if state == "PENDING" and info.reason not in ("None", "") else st.reason
                    if state not in ("COMPLETED",) or not st.exit_code:
                        st.exit_code = info.exit_code
                    if state != "COMPLETED" or not st.raw_state:
                        st.raw_state = info.raw_state
                elif marker and marker.get("state") in ("COMPLETED", "FAILED"):
                    state = marker["state"]
                    st.raw_state = st.raw_state or f"{state} (marker)"
                    if marker.get("elapsed_s") is not None:
                        from .slurm import format_elapsed

                        st.elapsed = format_elapsed(float(marker["elapsed_s"]))
                    st.node = st.node or str(marker.get("host") or "")
                elif info is None and tid.split("_")[0] in snap.pending:
                    state = "SUBMITTED"  # not asked about yet (just submitted)
                else:
                    state = "UNKNOWN"
                if marker and marker.get("error"):
                    st.error = marker["error"]
                if marker and "result" in marker and state == "COMPLETED":
                    st.result = marker["result"]
                states.append(state)
                if entry.get("array"):
                    st.tasks[str(n)] = state
            st.state = _aggregate(states)
            if st.state in ("PENDING", "SUBMITTED"):
                st.elapsed, st.exit_code = "", ""
        else:
            tasks = range(entry["array"]) if entry.get("array") else [None]
            for task in tasks:
                marker = _safe_marker(stage_dir, task)
                if marker:
                    if marker.get("error"):
                        st.error = marker["error"]
                    if "result" in marker:
                        st.result = marker["result"]
                    if task is not None:
                        st.tasks[str(task)] = marker.get("state", "UNKNOWN")
                    if marker.get("host") and not st.node:
                        st.node = str(marker["host"])
            if entry.get("started"):
                end = entry.get("ended") or now
                st.elapsed = _fmt_elapsed(end - entry["started"])
            if entry.get("exit_code") is not None:
                st.exit_code = str(entry["exit_code"])
            if entry.get("job_id"):
                st.job_ids = [str(entry["job_id"])]
            st.reason = entry.get("reason", "")
        st.interruptions = interruptions(stage_dir, entry)
        st.handoff = ", ".join(f"{i['kind']} {i['stage']}" for i in (entry.get("inputs") or {}).values()
                               if i.get("kind") in ("init", "resume"))
        st.progress = read_progress(stage_dir, st.state, now, _started(stage_dir, entry))
        st.metric = last_metric(stage_dir, st.progress) if st.state in ("RUNNING", "COMPLETED", *FAILED_LIKE) else ""
        out[name] = st
    _cancelled_upstream(run, out)
    if triage:
        _triage(run, out)
    return out, disagree


def interruptions(stage_dir: Path, entry: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The attempts of a stage that ended without completing, oldest first, each with its cause:
    PREEMPTED, TIMEOUT, REQUEUED (a requeue signal), NODE_FAIL, CANCELLED, FAILED (a crash)..."""
    from .runtime import read_attempts

    out: List[Dict[str, Any]] = []
    tasks = range(entry["array"]) if entry.get("array") else [None]
    for task in tasks:
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
        if st is None or st.state != "UNKNOWN" or any(run.stage_dir(name).glob("state*.json")):
            continue
        bad = [p for p in run.stage(name).get("depends_on", []) if p in out and out[p].state in FAILED_LIKE]
        if bad:
            st.state = "CANCELLED"
            st.reason = f"upstream stage {bad[0]} ended {out[bad[0]].state}: DependencyNeverSatisfied"


def _newer(stage_dir: Path, task: Optional[int], than: float) -> bool:
    try:
        return marker_path(stage_dir, task).stat().st_mtime > than
    except OSError:
        return False


def _triage(run: Run, states: Dict[str, StageState]) -> None:
    from .triage import Facts, diagnose

    stages = run.record.get("stages", {})
    root_failure: Dict[str, Optional[str]] = {}
    for name, st in states.items():
        entry = stages[name]
        upstream = None
        for parent in entry.get("depends_on", []):
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
        log = None if never_ran else _error_log(run, name, entry, st)
        if log is not None:
            st.log_file = str(log)
            st.log_tail = tail_lines(log)
        result = diagnose(Facts(state=st.state, raw_state=st.raw_state, exit_code=st.exit_code,
                                reason=st.reason or entry.get("reason", ""), error=st.error, log_tail=st.log_tail,
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


def cancel(run: Run, stages: Optional[List[str]] = None) -> List[str]:
    from . import poller, slurm

    run.reload()
    names = stages or list(run.record.get("order", []))
    ids = []
    for name in names:
        entry = run.stage(name)
        ids += [str(j["job_id"]) for j in entry.get("jobs", [])]
    if ids and run.record.get("backend") == "slurm":
        slurm.cancel(ids)
        poller.invalidate()
    return ids
