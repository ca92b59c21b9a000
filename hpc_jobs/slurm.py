"""Talking to Slurm's command-line tools: one state table, one query for many jobs.

The raw calls live here: :func:`sacct_jobs` asks about many job ids in ONE ``sacct`` call,
:func:`squeue_user` asks about all of a user's jobs in ONE ``squeue`` call (accounting off, or
``sacct`` lagging right after a submission). Nothing in hpc-jobs calls them directly for status:
every status read goes through :mod:`hpc_jobs.poller`, which caches the answers on disk for all of
a user's processes and backs off. A job missing from ``squeue`` is UNKNOWN, never "dead": the
stage's own marker file then tells how it ended.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

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


SACCT_FIELDS = "JobID,State,Elapsed,ExitCode,NodeList,Reason"
SQUEUE_FORMAT = "%i|%T|%M|%N|%r|%F|%K"


def sacct_jobs(base_ids: List[str]) -> Optional[Dict[str, JobInfo]]:
    """One ``sacct`` call for many jobs (array ids expand to their tasks); None when accounting
    is off or slurmdbd does not answer (the caller falls back to ``squeue``)."""
    text = sacct_text(base_ids, SACCT_FIELDS)
    return None if text is None else parse_sacct(text)


def sacct_text(base_ids: List[str], fields: str, options: Sequence[str] = ("-X",)) -> Optional[str]:
    """THE ``sacct`` call: ``--parsable2 --noheader -o FIELDS -j ID,ID,...`` (plus ``options``: ``-X``
    for allocations only; the step rows and ``-D`` for :mod:`hpc_jobs.efficiency`). None when
    accounting is off or sacct fails; why is in ``last_sacct_error``."""
    global last_sacct_error
    if not base_ids:
        return ""
    if not shutil.which("sacct"):
        last_sacct_error = "no sacct on PATH"
        return None
    try:
        proc = _run(["sacct", *options, "--parsable2", "--noheader", "-o", fields, "-j", ",".join(base_ids)])
    except (OSError, subprocess.TimeoutExpired) as exc:
        last_sacct_error = f"{type(exc).__name__}: {exc}"
        return None
    if proc.returncode != 0:  # accounting disabled or slurmdbd down: fall back to squeue
        last_sacct_error = (proc.stderr or proc.stdout or f"exit code {proc.returncode}").strip().splitlines()[-1:] or [""]
        last_sacct_error = last_sacct_error[0][:300] or f"exit code {proc.returncode}"
        return None
    last_sacct_error = ""
    return proc.stdout


last_sacct_error = ""  # why the last sacct call gave no answer ("" when it did)


def accounting_disabled(error: str) -> bool:
    """sacct's answer when the cluster has no accounting at all (not a passing slurmdbd hiccup)."""
    text = error.lower()
    return "disabled" in text or "no sacct" in text or "not configured" in text


def parse_sacct(text: str) -> Dict[str, JobInfo]:
    out: Dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        jid, raw, elapsed, exit_code, node, reason = parts[:6]
        if "." in jid:  # a job step (no -X on some wrappers)
            continue
        info = JobInfo(jid, map_state(raw), raw, elapsed, exit_code, node, reason)
        for key in _expand_array_id(jid):
            out[key] = info if key == jid else JobInfo(key, info.state, raw, elapsed, exit_code, node, reason)
    return out


# kept for callers of the earlier name
_sacct = sacct_jobs


def _expand_array_id(jid: str) -> List[str]:
    """``12_[0-2%1]`` (pending array tasks) -> ``12_0 12_1 12_2``; plain ids unchanged."""
    match = re.match(r"^(\d+)_\[(.+)\]$", jid)
    if not match:
        return [jid]
    base, spec = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in spec.split(","):
        try:
            if "-" in part:
                lo, hi = part.split("-")
                ids += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1)]
            else:
                ids.append(f"{base}_{int(part)}")
        except ValueError:
            continue
    return ids + [jid]


def parse_squeue(text: str) -> Dict[str, JobInfo]:
    out: Dict[str, JobInfo] = {}
    for line in text.splitlines():
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


def squeue_user(user: Optional[str] = None) -> Optional[Dict[str, JobInfo]]:
    """ONE ``squeue`` call: every job of ``user`` the controller still knows (finished ones for
    MinJobAge). None when squeue is missing or fails."""
    if not shutil.which("squeue"):
        return None
    import getpass

    try:
        proc = _run(["squeue", "-h", "-t", "all", "-u", user or getpass.getuser(), "-o", SQUEUE_FORMAT])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return parse_squeue(proc.stdout)


def _squeue(job_ids: List[str]) -> Dict[str, JobInfo]:
    if not shutil.which("squeue"):
        return {}
    proc = _run(["squeue", "-h", "-t", "all", "-o", SQUEUE_FORMAT, "-j", ",".join(job_ids)])
    return parse_squeue(proc.stdout)


def query(job_ids: Iterable[str]) -> Dict[str, JobInfo]:
    """Uncached: the state of every job id (``123``, ``123_4``) in one scheduler call (two while
    sacct lags). Status reads use :func:`hpc_jobs.poller.query` instead."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    base_ids = sorted({j.split("_")[0] for j in ids})
    result = sacct_jobs(base_ids)
    if result is None:
        return _squeue(base_ids)
    missing = [j for j in base_ids if j not in result and not any(k.startswith(j + "_") for k in result)]
    if missing:  # sacct lags squeue by a second right after submission
        result.update(_squeue(missing))
    return result


def parse_elapsed(text: str) -> Optional[int]:
    """Slurm durations (``1-02:03:04``, ``02:03:04``, ``3:04``) -> seconds; None if unreadable."""
    text = (text or "").strip()
    if not text or text in ("INVALID", "UNLIMITED", "Partition_Limit"):
        return None
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        try:
            days = int(d)
        except ValueError:
            return None
    try:
        nums = [int(float(x)) for x in text.split(":")]
    except ValueError:
        return None
    while len(nums) < 3:
        nums.insert(0, 0)
    h, m, s = nums[-3:]
    return days * 86400 + h * 3600 + m * 60 + s


def format_elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{d}-" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


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
    mem_mb: Optional[int] = None  # the smallest node's memory (sinfo %m), or MaxMemPerNode if lower
    cpus_per_node: Optional[int] = None  # the smallest node's CPUs (sinfo %c)


def scheduler_partitions() -> Dict[str, PartitionInfo]:
    """Partitions with time limits and GPUs per node, from ``scontrol`` and ``sinfo``."""
    from .spec import parse_time

    proc = _run(["scontrol", "show", "partition", "--oneliner"])
    if proc.returncode != 0:
        raise UserError(f"cannot read partitions from Slurm: {proc.stderr.strip() or 'scontrol failed'}")
    gres, nodes_mem, nodes_cpus = _partition_nodes()
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
            mem_mb=_min_known(nodes_mem.get(name), _int_or_none(fields.get("MaxMemPerNode"))),
            cpus_per_node=nodes_cpus.get(name),
        )
    return parts


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(str(text).rstrip("+"))
    except (TypeError, ValueError):
        return None  # UNLIMITED, N/A


def _min_known(*values: Optional[int]) -> Optional[int]:
    known = [v for v in values if v]
    return min(known) if known else None


def _partition_nodes():
    """ONE ``sinfo`` call: per partition the most GPUs a node has, and the smallest node's memory
    (MB) and CPUs (a job must fit on any of its nodes)."""
    proc = _run(["sinfo", "-h", "-o", "%R|%G|%m|%c"])
    out: Dict[str, int] = {}
    mem: Dict[str, int] = {}
    cpus: Dict[str, int] = {}
    for line in proc.stdout.splitlines():
        name, _, rest = line.partition("|")
        gres, _, rest = rest.partition("|")
        node_mem, _, node_cpus = rest.partition("|")
        name = name.strip()
        for table, value in ((mem, _int_or_none(node_mem)), (cpus, _int_or_none(node_cpus))):
            if value:
                table[name] = min(table.get(name, value), value)
        count = 0
        for item in gres.split(","):
            match = re.match(r"^gpu(?::[^:(]+)?:(\d+)", item.strip())
            if match:
                count = max(count, int(match.group(1)))
        out[name] = max(out.get(name, 0), count)
    return out, mem, cpus


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
