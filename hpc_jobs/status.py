"""What a run is doing: one scheduler query for all its jobs, merged with the stages' own markers.

The scheduler is the authority while it knows a job. When it does not (no accounting, or the job
left ``squeue`` after MinJobAge), the marker the stage wrote (``state.json``, with its job id)
tells how it ended; a job neither knows is UNKNOWN, never assumed dead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .fsutil import read_json
from .ledger import Run
from .runtime import read_marker

FAILED_LIKE = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED")


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

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _aggregate(states: List[str]) -> str:
    if not states:
        return "UNKNOWN"
    if all(s == "COMPLETED" for s in states):
        return "COMPLETED"
    for active in ("RUNNING", "REQUEUED", "PREEMPTED", "PENDING"):
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
            from .launch import _array_len

            ids += [f"{job['job_id']}_{i}" for i in range(_array_len(job["array"]))]
        else:
            ids.append(str(job["job_id"]))
    return ids


def _marker_state(stage_dir: Path, task: Optional[int], job_id: Optional[str]) -> Optional[Dict[str, Any]]:
    marker = read_marker(stage_dir, task)
    if not marker:
        return None
    if job_id is not None and marker.get("job_id") not in (None, job_id.split("_")[0], job_id):
        return None  # a marker from an earlier attempt
    return marker


def stage_states(run: Run) -> Dict[str, StageState]:
    from . import slurm

    run.reload()
    stages = run.record.get("stages", {})
    ids = [i for entry in stages.values() for i in _task_ids(entry)]
    infos = slurm.query(ids) if (ids and run.record.get("backend") == "slurm" and slurm.available()) else {}
    out: Dict[str, StageState] = {}
    for name in run.record.get("order", list(stages)):
        entry = stages[name]
        stage_dir = run.stage_dir(name)
        st = StageState(name=name, state=entry.get("state", "UNKNOWN"))
        st.progress = read_json(stage_dir / "heartbeat.json")
        if entry.get("where") == "batch" and run.record.get("backend") == "slurm" and entry.get("jobs"):
            task_ids = _task_ids(entry)
            st.job_ids = [str(j["job_id"]) for j in entry["jobs"]]
            states = []
            for n, tid in enumerate(task_ids):
                info = infos.get(tid) or infos.get(tid.split("_")[0])
                task = n if entry.get("array") else None
                marker = _marker_state(stage_dir, task, tid)
                if info is not None and info.state != "UNKNOWN":
                    state = info.state
                    st.elapsed, st.node = info.elapsed, info.node
                    st.reason = info.reason if state == "PENDING" and info.reason not in ("None", "") else ""
                    st.exit_code = info.exit_code
                elif marker and marker.get("state") in ("COMPLETED", "FAILED"):
                    state = marker["state"]
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
        else:
            tasks = range(entry["array"]) if entry.get("array") else [None]
            for task in tasks:
                marker = read_marker(stage_dir, task)
                if marker:
                    if marker.get("error"):
                        st.error = marker["error"]
                    if "result" in marker:
                        st.result = marker["result"]
                    if task is not None:
                        st.tasks[str(task)] = marker.get("state", "UNKNOWN")
            if entry.get("started"):
                end = entry.get("ended") or time.time()
                st.elapsed = _fmt_elapsed(end - entry["started"])
            if entry.get("exit_code") is not None:
                st.exit_code = str(entry["exit_code"])
            st.reason = entry.get("reason", "")
        out[name] = st
    return out


def _fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"


def log_files(run: Run, stage: str, task: Optional[int] = None) -> List[Path]:
    """The log files of a stage's current attempt, newest last (stdout before stderr)."""
    entry = run.stage(stage)
    stage_dir = run.stage_dir(stage)
    files: List[Path] = []
    if entry.get("where") == "batch" and run.record.get("backend") == "slurm":
        folder = stage_dir / "slurm"
        for job in entry.get("jobs", []):
            jid = job["job_id"]
            pattern = f"{jid}_{task if task is not None else '*'}_0_log" if entry.get("array") else f"{jid}_0_log"
            for suffix in (".out", ".err"):
                files += sorted(folder.glob(pattern + suffix))
    else:
        local = stage_dir / "local"
        prefix = f"task{task}." if task is not None else ("task*." if entry.get("array") else "")
        files += sorted(local.glob(f"{prefix}rank0.log"))
    return files


def cancel(run: Run, stages: Optional[List[str]] = None) -> List[str]:
    from . import slurm

    run.reload()
    names = stages or list(run.record.get("order", []))
    ids = []
    for name in names:
        entry = run.stage(name)
        ids += [str(j["job_id"]) for j in entry.get("jobs", [])]
    if ids and run.record.get("backend") == "slurm":
        slurm.cancel(ids)
    return ids
