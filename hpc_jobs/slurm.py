"""Talking to Slurm's command-line tools: one state table, one query for many jobs.

Every status read asks the scheduler about all of a run's jobs in ONE call (``sacct`` with the
job ids, or ``squeue`` when accounting is off). A job missing from ``squeue`` is UNKNOWN, never
"dead": the stage's own marker file then tells how it ended.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from .errors import UserError

# hpc-jobs states: PENDING RUNNING COMPLETED FAILED CANCELLED TIMEOUT PREEMPTED REQUEUED UNKNOWN
# (+ OUT_OF_MEMORY and NODE_FAIL kept apart: their cure differs).
STATE_TABLE: Dict[str, str] = {
    "PENDING": "PENDING",
    "CONFIGURING": "PENDING",
    "REQUEUE_HOLD": "PENDING",
    "REQUEUE_FED": "REQUEUED",
    "REQUEUED": "REQUEUED",
    "RESIZING": "RUNNING",
    "RUNNING": "RUNNING",
    "COMPLETING": "RUNNING",
    "SIGNALING": "RUNNING",
    "STAGE_OUT": "RUNNING",
    "SUSPENDED": "RUNNING",
    "STOPPED": "RUNNING",
    "COMPLETED": "COMPLETED",
    "FAILED": "FAILED",
    "BOOT_FAIL": "FAILED",
    "DEADLINE": "TIMEOUT",
    "TIMEOUT": "TIMEOUT",
    "CANCELLED": "CANCELLED",
    "REVOKED": "CANCELLED",
    "SPECIAL_EXIT": "FAILED",
    "PREEMPTED": "PREEMPTED",
    "NODE_FAIL": "NODE_FAIL",
    "OUT_OF_MEMORY": "OUT_OF_MEMORY",
}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "PREEMPTED"}


def map_state(raw: str) -> str:
    word = raw.split()[0].rstrip("+") if raw else ""
    return STATE_TABLE.get(word, "UNKNOWN")


@dataclass
class JobInfo:
    job_id: str  # "123" or "123_4" for an array task
    state: str
    raw_state: str
    elapsed: str = ""
    exit_code: str = ""
    node: str = ""
    reason: str = ""


def available() -> bool:
    return shutil.which("sbatch") is not None


def _run(args: List[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def version() -> Optional[str]:
    if not shutil.which("sinfo"):
        return None
    out = _run(["sinfo", "--version"]).stdout.strip()
    return out or None


def _sacct(job_ids: List[str]) -> Optional[Dict[str, JobInfo]]:
    if not shutil.which("sacct"):
        return None
    fields = "JobID,State,Elapsed,ExitCode,NodeList,Reason"
    proc = _run(["sacct", "-X", "--parsable2", "--noheader", "-o", fields, "-j", ",".join(job_ids)])
    if proc.returncode != 0:
        return None  # accounting disabled or slurmdbd down: fall back to squeue
    out: Dict[str, JobInfo] = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        jid, raw, elapsed, exit_code, node, reason = parts[:6]
        info = JobInfo(jid, map_state(raw), raw, elapsed, exit_code, node, reason)
        for key in _expand_array_id(jid):
            out[key] = info if key == jid else JobInfo(key, info.state, raw, elapsed, exit_code, node, reason)
    return out


def _expand_array_id(jid: str) -> List[str]:
    """``12_[0-2%1]`` (pending array tasks) -> ``12_0 12_1 12_2``; plain ids unchanged."""
    match = re.match(r"^(\d+)_\[(.+)\]$", jid)
    if not match:
        return [jid]
    base, spec = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            ids += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1)]
        else:
            ids.append(f"{base}_{part}")
    return ids + [jid]


def _squeue(job_ids: List[str]) -> Dict[str, JobInfo]:
    out: Dict[str, JobInfo] = {}
    if not shutil.which("squeue"):
        return out
    proc = _run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%M|%N|%r|%F|%K", "-j", ",".join(job_ids)])
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, raw, elapsed, node, reason = parts[:5]
        info = JobInfo(jid, map_state(raw), raw, elapsed, "", node, reason)
        for key in _expand_array_id(jid):
            out[key] = info
        if len(parts) >= 7 and parts[5] and parts[6].isdigit():  # array task: also under ArrayJobID_Task
            out[f"{parts[5]}_{parts[6]}"] = info
    return out


def query(job_ids: Iterable[str]) -> Dict[str, JobInfo]:
    """State of every job id (``123``, ``123_4``) in one scheduler call; missing ids are absent."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    base_ids = sorted({j.split("_")[0] for j in ids})
    result = _sacct(base_ids)
    if result is None:
        return _squeue(base_ids)
    missing = [j for j in base_ids if j not in result and not any(k.startswith(j + "_") for k in result)]
    if missing:  # sacct lags squeue by a second right after submission
        result.update(_squeue(missing))
    return result


def cancel(job_ids: Iterable[str]) -> None:
    ids = [str(j) for j in job_ids if j]
    if ids:
        _run(["scancel", *ids])


def test_only(script: str) -> Optional[str]:
    """``sbatch --test-only`` on a script text; returns the error line, or None when it would run."""
    proc = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode == 0:
        return None
    lines = [l for l in (proc.stderr or proc.stdout).splitlines() if l.strip()]
    return lines[-1] if lines else f"sbatch --test-only exited {proc.returncode}"


@dataclass
class PartitionInfo:
    name: str
    max_time_s: Optional[int]
    gpus_per_node: int
    nodes: int
    default: bool


def scheduler_partitions() -> Dict[str, PartitionInfo]:
    """Partitions with time limits and GPUs per node, from ``scontrol`` and ``sinfo``."""
    from .spec import parse_time

    proc = _run(["scontrol", "show", "partition", "--oneliner"])
    if proc.returncode != 0:
        raise UserError(f"cannot read partitions from Slurm: {proc.stderr.strip() or 'scontrol failed'}")
    gres = _partition_gres()
    parts: Dict[str, PartitionInfo] = {}
    for line in proc.stdout.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        name = fields.get("PartitionName")
        if not name:
            continue
        max_time = fields.get("MaxTime", "UNLIMITED")
        parts[name] = PartitionInfo(
            name=name,
            max_time_s=None if max_time in ("UNLIMITED", "INFINITE") else parse_time(max_time),
            gpus_per_node=gres.get(name, 0),
            nodes=int(fields.get("TotalNodes", "0") or 0),
            default=fields.get("Default") == "YES",
        )
    return parts


def _partition_gres() -> Dict[str, int]:
    proc = _run(["sinfo", "-h", "-o", "%R|%G"])
    out: Dict[str, int] = {}
    for line in proc.stdout.splitlines():
        name, _, gres = line.partition("|")
        count = 0
        for item in gres.split(","):
            match = re.match(r"^gpu(?::[^:(]+)?:(\d+)", item.strip())
            if match:
                count = max(count, int(match.group(1)))
        out[name.strip()] = max(out.get(name.strip(), 0), count)
    return out


def max_array_size() -> int:
    proc = _run(["scontrol", "show", "config"])
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            try:
                return int(value.strip())
            except ValueError:
                break
    return 1001
