"""How well a run used what it asked for, and right-sizing the next launch from it.

**Efficiency.** After a stage's jobs end, ONE ``sacct`` call (:func:`hpc_jobs.slurm.sacct_text`,
with the step rows and ``-D`` for every requeued run of a job) gives, per Slurm job or array task
(``JOBID``, ``JOBID_i``; its ``JOBID.batch``/``JOBID.0``/``JOBID.extern`` step rows carry MaxRSS and
TotalCPU):

* CPU efficiency: TotalCPU / (AllocCPUS x Elapsed);
* peak memory per node vs requested: the largest step's MaxRSS x its tasks per node (MaxRSS is the
  largest task's; Slurm samples it every JobAcctGatherFrequency seconds, so a spike shorter than
  that can be missed) vs AllocTRES ``mem`` / nodes;
* time used vs the limit: the longest single run (a requeued job runs several times) vs Timelimit;
* CPU-hours (AllocCPUS x Elapsed, what ``sreport`` charges) and GPU-hours (``gres/gpu`` of
  AllocTRES x Elapsed), over every submission and requeue of the stage.

GPU utilisation and peak GPU memory come from the job itself: the engine's heartbeat samples them
(:class:`GpuSampler`: NVML, else ``nvidia-smi``) into ``heartbeat.json``; without a GPU, or a
stage that is not an engine training loop, they are "n/a", never a made-up number.

The answers of jobs that ended more than :data:`SETTLE_S` ago never change again: they are kept
in ``RUN_DIR/efficiency.json``, so a finished run costs no further ``sacct`` call.

**Flags.** ``status`` flags a finished stage that used under a quarter of its memory or of its
time limit, or whose GPUs were idle (mean utilisation under 10%).

**Right-sizing.** :func:`right_size` sets each batch stage's ``mem``, ``time`` and
``cpus_per_task`` from the peaks of earlier runs of the same workflow and preset on the same
cluster (``--right-size``: the last :data:`HISTORY_RUNS` that did not fail it; ``--resources-from
RUN``: that run): memory peak x1.5 rounded up, time longest x1.5 + 5 minutes rounded up to the
minute, CPUs per task used x1.5 rounded up (never more than asked); never below what a run needed,
never above the partition's limits. A stage whose newest run ended OUT_OF_MEMORY (TIMEOUT) gets
twice that run's memory (time limit) instead.

Nothing here imports torch or numpy (the launch path imports this module).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import slurm
from .spec import format_time, parse_mem_mb

EFF_FIELDS = "JobID,State,Elapsed,Timelimit,TotalCPU,AllocCPUS,MaxRSS,ReqMem,AllocTRES,NNodes,NTasks,End"
CACHE_FILE = "efficiency.json"
CACHE_VERSION = 1
SETTLE_S = 30.0  # sacct's record of a job (its steps' MaxRSS) is complete this long after its end
LOW_USE = 0.25  # under a quarter of the memory or time asked: flagged
GPU_IDLE_PCT = 10.0  # mean GPU utilisation under this: "GPUs idle"
HISTORY_RUNS = 5  # --right-size looks at this many newest earlier runs
MEM_MARGIN, TIME_MARGIN, CPU_MARGIN = 1.5, 1.5, 1.5
TIME_EXTRA_S = 300  # + 5 minutes on top of the time margin
MIN_MEM_MB = 256
FAILED_FACTOR = 2  # a stage killed for memory or time gets twice that run's request

# -- parsing sacct's units ------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)([nc]?)$", re.IGNORECASE)
_UNIT_MB = {"": 1 / (1024 * 1024), "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 ** 2, "P": 1024.0 ** 3}


def parse_size_mb(text: Optional[str], default_unit: str = "") -> Optional[float]:
    """sacct sizes -> MB: ``12256K``, ``512M``, ``1.5G``, ``0``; ``-``, empty and unreadable -> None.
    A bare number is bytes (MaxRSS), or ``default_unit`` (ReqMem, AllocTRES' mem: MB). A trailing
    ``n``/``c`` (per node / per CPU, Slurm before 21.08) is dropped: :func:`_per_node_request`
    reads it."""
    text = (text or "").strip()
    match = _SIZE_RE.match(text)
    if not match:
        return None
    unit = (match.group(2) or default_unit).upper()
    return float(match.group(1)) * _UNIT_MB[unit]


def parse_duration_s(text: Optional[str]) -> Optional[float]:
    """Slurm durations with fractions (TotalCPU ``01:02.345``, ``1-02:03:04``); ``-``, empty,
    UNLIMITED -> None."""
    text = (text or "").strip()
    if not text or text in ("-", "INVALID", "UNLIMITED", "Partition_Limit"):
        return None
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        if not d.isdigit():
            return None
        days = int(d)
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        return None
    if len(parts) > 3:
        return None
    total = 0.0
    for value in parts:
        total = total * 60 + value
    return days * 86400 + total


def parse_tres(text: Optional[str]) -> Dict[str, str]:
    """``billing=1,cpu=1,gres/gpu=2,mem=512M,node=1`` -> ``{"cpu": "1", "gres/gpu": "2", ...}``."""
    out: Dict[str, str] = {}
    for item in (text or "").split(","):
        key, eq, value = item.partition("=")
        if eq:
            out[key.strip()] = value.strip()
    return out


def tres_gpus(tres: Dict[str, str]) -> int:
    """GPUs of an AllocTRES: ``gres/gpu=2`` (typed entries ``gres/gpu:a100=2`` count when the plain
    one is missing)."""
    if tres.get("gres/gpu", "").isdigit():
        return int(tres["gres/gpu"])
    return sum(int(v) for k, v in tres.items() if k.startswith("gres/gpu:") and v.isdigit())


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def _per_node_request(req_mem: str, tres: Dict[str, str], nodes: int, cpus: Optional[int]) -> Optional[float]:
    """Memory asked per node (MB): AllocTRES' ``mem`` is the job's total; else ReqMem (a total in
    Slurm 21.08+, ``...n`` per node or ``...c`` per CPU before)."""
    nodes = max(1, nodes)
    total = parse_size_mb(tres.get("mem"), default_unit="M")
    if total:
        return total / nodes
    value = parse_size_mb(req_mem, default_unit="M")
    if value is None:
        return None
    suffix = req_mem.strip()[-1:].lower()
    if suffix == "n":
        return value
    if suffix == "c":
        return value * (cpus or 1) / nodes
    return value / nodes


# -- one job's (or array task's) usage ----------------------------------------------------------
@dataclass
class Usage:
    """One Slurm job or array task, over every run of it sacct knows (a requeue runs it again)."""

    job_id: str
    state: str = "UNKNOWN"  # hpc-jobs' word for its newest run (slurm.map_state)
    raw_state: str = ""
    runs: int = 0  # allocation records: 1, more when requeued
    elapsed_s: float = 0.0  # all runs together
    longest_s: float = 0.0  # the longest single run
    limit_s: Optional[float] = None  # the newest run's time limit
    cpu_s: Optional[float] = None  # TotalCPU, all runs
    cpu_alloc_s: float = 0.0  # AllocCPUS x Elapsed, all runs
    alloc_cpus: Optional[int] = None
    nodes: int = 1
    peak_mem_mb: Optional[float] = None  # per node: the largest step's MaxRSS x its tasks per node
    req_mem_mb: Optional[float] = None  # per node
    gpus: int = 0  # per job (all nodes)
    gpu_s: float = 0.0  # GPUs x Elapsed, all runs
    end: str = ""  # the newest run's End (ISO, "Unknown" while running)
    # from the job's heartbeat (GpuSampler); None: not measured
    gpu_util_mean: Optional[float] = None
    gpu_mem_peak_mb: Optional[float] = None

    @property
    def cpu_eff(self) -> Optional[float]:
        """At most 1 (Elapsed is whole seconds, TotalCPU is not: a 2.4 s job can read 114%)."""
        if self.cpu_s is None or self.cpu_alloc_s <= 0:
            return None
        return min(1.0, self.cpu_s / self.cpu_alloc_s)

    @property
    def mem_frac(self) -> Optional[float]:
        return self.peak_mem_mb / self.req_mem_mb if self.peak_mem_mb is not None and self.req_mem_mb else None

    @property
    def time_frac(self) -> Optional[float]:
        return self.longest_s / self.limit_s if self.limit_s else None

    @property
    def cpu_hours(self) -> float:
        return self.cpu_alloc_s / 3600.0

    @property
    def gpu_hours(self) -> float:
        return self.gpu_s / 3600.0

    @property
    def final(self) -> bool:
        return self.state in slurm.FINAL_STATES and self.end not in ("", "Unknown", "None")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Usage":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_usage(text: str) -> Dict[str, Usage]:
    """``sacct -D --parsable2 --noheader -o EFF_FIELDS`` (with the step rows) -> job or array task
    id -> :class:`Usage`. A step row (``JOBID.batch``, ``JOBID_3.0``, ``JOBID.extern``) belongs to
    the allocation row above it with the same id; pending array rows (``12_[3-9]``) are skipped."""
    out: Dict[str, Usage] = {}
    names = EFF_FIELDS.split(",")
    current: Optional[Usage] = None
    current_id = ""
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < len(names):
            continue
        row = dict(zip(names, parts))
        jid = row["JobID"].strip()
        if not jid or "[" in jid:
            continue
        base, dot, _step = jid.partition(".")
        tres = parse_tres(row["AllocTRES"])
        nodes = _int(row["NNodes"]) or 1
        elapsed = parse_duration_s(row["Elapsed"]) or 0.0
        if dot:  # a step of the allocation above
            if current is None or base != current_id:
                continue
            rss = parse_size_mb(row["MaxRSS"])
            if rss is not None:
                per_node = rss * math.ceil((_int(row["NTasks"]) or 1) / max(1, nodes))
                current.peak_mem_mb = max(current.peak_mem_mb or 0.0, per_node)
            continue
        usage = out.get(jid) or Usage(job_id=jid)
        out[jid] = current = usage
        current_id = jid
        cpus = _int(row["AllocCPUS"])
        usage.runs += 1
        usage.state, usage.raw_state = slurm.map_state(row["State"]), row["State"]
        usage.elapsed_s += elapsed
        usage.longest_s = max(usage.longest_s, elapsed)
        usage.limit_s = parse_duration_s(row["Timelimit"])
        cpu = parse_duration_s(row["TotalCPU"])
        if cpu is not None:
            usage.cpu_s = (usage.cpu_s or 0.0) + cpu
        usage.alloc_cpus = cpus
        usage.cpu_alloc_s += (cpus or 0) * elapsed
        usage.nodes = nodes
        usage.req_mem_mb = _per_node_request(row["ReqMem"], tres, nodes, cpus) or usage.req_mem_mb
        usage.gpus = tres_gpus(tres)
        usage.gpu_s += usage.gpus * elapsed
        usage.end = row["End"].strip()
    for usage in out.values():
        # Slurm's accounting-based enforcement (JobAcctGatherParams=OverMemoryKill, clusters without
        # cgroups) kills a job over its memory but records it FAILED: the sampled peak says why
        if usage.state == "FAILED" and usage.peak_mem_mb and usage.req_mem_mb and usage.peak_mem_mb >= usage.req_mem_mb:
            usage.state = "OUT_OF_MEMORY"
    return out


def query_usage(job_ids: Iterable[str]) -> Optional[Dict[str, Usage]]:
    """ONE sacct call for these jobs (base ids; arrays expand to their tasks); None when accounting
    does not answer."""
    base = sorted({str(j).split("_")[0].split(".")[0] for j in job_ids if j})
    if not base:
        return {}
    text = slurm.sacct_text(base, EFF_FIELDS, options=("-D",))
    return None if text is None else parse_usage(text)


# -- a stage and a run ----------------------------------------------------------------------------
@dataclass
class StageEfficiency:
    name: str
    state: str = ""  # the newest runs' states together (states.aggregate)
    tasks: List[Usage] = field(default_factory=list)  # each task's newest submission
    cpu_hours: float = 0.0  # every submission of the stage (a resume's earlier jobs too)
    gpu_hours: float = 0.0
    resources: Dict[str, Any] = field(default_factory=dict)  # what the run asked (run.json)

    def _known(self, attr: str) -> List[float]:
        return [getattr(t, attr) for t in self.tasks if getattr(t, attr) is not None]

    @property
    def cpu_eff(self) -> Optional[float]:
        used = [t for t in self.tasks if t.cpu_s is not None and t.cpu_alloc_s > 0]
        total = sum(t.cpu_alloc_s for t in used)
        return min(1.0, sum(t.cpu_s for t in used) / total) if total else None

    @property
    def peak_mem_mb(self) -> Optional[float]:
        values = self._known("peak_mem_mb")
        return max(values) if values else None

    @property
    def req_mem_mb(self) -> Optional[float]:
        values = self._known("req_mem_mb")
        return max(values) if values else None

    @property
    def longest_s(self) -> Optional[float]:
        return max((t.longest_s for t in self.tasks), default=None) if self.tasks else None

    @property
    def needed_s(self) -> Optional[float]:
        """The most time one task needed, its requeued runs together."""
        return max((t.elapsed_s for t in self.tasks), default=None) if self.tasks else None

    @property
    def limit_s(self) -> Optional[float]:
        values = self._known("limit_s")
        return max(values) if values else None

    @property
    def gpus(self) -> int:
        return max((t.gpus for t in self.tasks), default=0)

    @property
    def gpu_util_mean(self) -> Optional[float]:
        values = self._known("gpu_util_mean")
        return sum(values) / len(values) if values else None

    @property
    def gpu_mem_peak_mb(self) -> Optional[float]:
        values = self._known("gpu_mem_peak_mb")
        return max(values) if values else None

    @property
    def flags(self) -> List[str]:
        """``mem 9%``, ``time 2%`` (under a quarter of what was asked), ``GPUs idle``; only for a
        stage whose tasks all completed (a failed one's use says little)."""
        if not self.tasks or self.state != "COMPLETED":
            return []
        out = []
        peak, req = self.peak_mem_mb, self.req_mem_mb
        if peak is not None and req and peak < LOW_USE * req:
            out.append(f"mem {fmt_pct(peak / req)}")
        longest, limit = self.longest_s, self.limit_s
        if longest is not None and limit and longest < LOW_USE * limit:
            out.append(f"time {fmt_pct(longest / limit)}")
        util = self.gpu_util_mean
        if self.gpus and util is not None and util < GPU_IDLE_PCT:
            out.append("GPUs idle")
        return out

    def as_dict(self) -> Dict[str, Any]:
        def r(x: Optional[float], n: int = 3) -> Optional[float]:
            return None if x is None else round(x, n)

        return {
            "state": self.state, "tasks": len(self.tasks),
            "cpu_efficiency": r(self.cpu_eff), "peak_mem_mb": r(self.peak_mem_mb, 1),
            "req_mem_mb": r(self.req_mem_mb, 1), "longest_s": r(self.longest_s, 1), "limit_s": r(self.limit_s, 1),
            "gpus": self.gpus, "gpu_util_mean": r(self.gpu_util_mean, 1), "gpu_mem_peak_mb": r(self.gpu_mem_peak_mb, 1),
            "cpu_hours": r(self.cpu_hours, 4), "gpu_hours": r(self.gpu_hours, 4), "flags": self.flags,
            "task_list": [dict(t.to_dict(), cpu_efficiency=r(t.cpu_eff), cpu_hours=r(t.cpu_hours, 4),
                               gpu_hours=r(t.gpu_hours, 4)) for t in self.tasks],
        }


@dataclass
class RunEfficiency:
    source: str  # "sacct", or why there are no figures ("no Slurm accounting: ...")
    stages: Dict[str, StageEfficiency] = field(default_factory=dict)

    @property
    def cpu_hours(self) -> float:
        return sum(s.cpu_hours for s in self.stages.values())

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages.values())

    def as_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "cpu_hours": round(self.cpu_hours, 4), "gpu_hours": round(self.gpu_hours, 4),
                "stages": {n: s.as_dict() for n, s in self.stages.items()}}


def _heartbeat_gpu(task_dir) -> Tuple[Optional[float], Optional[float]]:
    from .fsutil import read_json

    try:
        data = read_json(task_dir / "heartbeat.json")
    except (ValueError, OSError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    util, mem = data.get("gpu_util_mean"), data.get("gpu_mem_peak_mb")
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    return (float(util) if ok(util) else None), (float(mem) if ok(mem) else None)


def _stage_job_ids(rec) -> List[str]:
    """Every Slurm id a stage ever ran as (every submission in its history)."""
    ids = [str(j) for sub in rec.history for j in sub.get("job_ids", [])]
    return list(dict.fromkeys(ids + rec.job_ids()))


def _load_cache(run) -> Dict[str, Usage]:
    from .fsutil import read_json

    try:
        data = read_json(run.dir / CACHE_FILE)
    except (ValueError, OSError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    try:
        return {k: Usage.from_dict(v) for k, v in (data.get("jobs") or {}).items()}
    except TypeError:
        return {}


def _settled(usage: Usage, now: float) -> bool:
    import datetime as _dt

    if not usage.final:
        return False
    try:
        ended = _dt.datetime.fromisoformat(usage.end).timestamp()
    except ValueError:
        return False
    return now - ended > SETTLE_S


def usages(runs: Sequence[Any], only_final: Optional[Callable[[Any, str], bool]] = None,
           now: Optional[float] = None) -> Tuple[Dict[str, Dict[str, Usage]], str]:
    """For several runs at once: run id -> job id -> Usage, from each run's cache and ONE sacct
    call for every job not settled in a cache. ``only_final(run, stage)``: ask only about those
    stages' jobs (status asks about ended stages only). Returns the answers and their source."""
    now = time.time() if now is None else now
    cached: Dict[str, Dict[str, Usage]] = {}
    wanted: Dict[str, List[str]] = {}
    for run in runs:
        cache = _load_cache(run)
        cached[run.id] = {k: v for k, v in cache.items() if _settled(v, now)}
        ids = []
        for rec in run.in_order():
            if rec.where != "batch" or (only_final and not only_final(run, rec.name)):
                continue
            ids += _stage_job_ids(rec)
        wanted[run.id] = [b for b in dict.fromkeys(i.split("_")[0] for i in ids)
                          if not any(k == b or k.startswith(b + "_") for k in cached[run.id])]
    ask = sorted({b for ids in wanted.values() for b in ids})
    source = "sacct"
    if ask:
        answer = query_usage(ask)
        if answer is None:
            source = f"no Slurm accounting: {slurm.last_sacct_error or 'sacct failed'}"
            answer = {}
        for run in runs:
            mine = {k: v for k, v in answer.items() if k.split("_")[0] in set(wanted[run.id])}
            cached[run.id].update(mine)
            if mine and any(_settled(v, now) for v in mine.values()):
                _save_cache(run, cached[run.id], now)
    return cached, source


def _save_cache(run, jobs: Dict[str, Usage], now: float) -> None:
    from .fsutil import atomic_write_json

    try:
        atomic_write_json(run.dir / CACHE_FILE, {"version": CACHE_VERSION, "jobs": {
            k: v.to_dict() for k, v in jobs.items() if _settled(v, now)}}, fsync=False)
    except OSError:
        pass  # a run directory we may read but not write: ask again next time


def stage_efficiency(run, rec, jobs: Dict[str, Usage]) -> StageEfficiency:
    from . import states as statesmod
    from .runtime import task_dir

    eff = StageEfficiency(rec.name, resources=dict(rec.resources))
    for task in rec.task_indices:
        sid = rec.slurm_id(task)
        usage = jobs.get(sid) if sid else None
        if usage is None:
            continue
        usage.gpu_util_mean, usage.gpu_mem_peak_mb = _heartbeat_gpu(task_dir(run.stage_dir(rec.name), task))
        eff.tasks.append(usage)
    if eff.tasks:
        eff.state = statesmod.aggregate(t.state for t in eff.tasks) if rec.array else eff.tasks[0].state
    for jid in _stage_job_ids(rec):
        for key, usage in jobs.items():
            if key == jid or key.startswith(jid + "_"):
                eff.cpu_hours += usage.cpu_hours
                eff.gpu_hours += usage.gpu_hours
    return eff


def for_runs(runs: Sequence[Any], only_final: Optional[Callable[[Any, str], bool]] = None) -> Dict[str, RunEfficiency]:
    """Each run's efficiency (Slurm runs only; others get a source saying why there is none)."""
    slurm_runs = [r for r in runs if r.backend == "slurm"]
    out = {r.id: RunEfficiency(source=f"no Slurm accounting: the run used the {r.backend or 'unknown'} backend")
           for r in runs if r.backend != "slurm"}
    if not slurm_runs:
        return out
    if not slurm.available():
        return {**out, **{r.id: RunEfficiency(source="no Slurm accounting here (no sbatch on PATH)") for r in slurm_runs}}
    jobs, source = usages(slurm_runs, only_final)
    for run in slurm_runs:
        eff = RunEfficiency(source=source)
        for rec in run.in_order():
            if rec.where == "batch" and rec.jobs and not rec.debug:
                eff.stages[rec.name] = stage_efficiency(run, rec, jobs[run.id])
        out[run.id] = eff
    return out


def for_run(run, states: Optional[Dict[str, Any]] = None) -> RunEfficiency:
    """One run's efficiency. ``states`` (``status.stage_states``): ask sacct only about stages that
    have ended (a running run costs no extra call until a stage ends)."""
    from . import states as statesmod

    only = None
    if states is not None:
        only = lambda _run, name: name in states and states[name].state in statesmod.FINAL  # noqa: E731
    return for_runs([run], only)[run.id]


# -- showing it -------------------------------------------------------------------------------------
def fmt_mem(mb: Optional[float]) -> str:
    """``186M``, ``4.1G``; "n/a" when unknown."""
    if mb is None:
        return "n/a"
    if mb >= 1024:
        return f"{mb / 1024:.1f}G"
    return f"{mb:.0f}M"


def fmt_pct(frac: Optional[float]) -> str:
    if frac is None:
        return "n/a"
    return "<1%" if 0 < frac < 0.01 else f"{100 * frac:.0f}%"


def fmt_hours(hours: float) -> str:
    return f"{hours:.3f}" if hours < 10 else f"{hours:.1f}"


def row(eff: StageEfficiency) -> Dict[str, str]:
    """The table cells of a stage (status, report)."""
    peak, req = eff.peak_mem_mb, eff.req_mem_mb
    longest, limit = eff.longest_s, eff.limit_s
    util = eff.gpu_util_mean
    return {
        "stage": eff.name, "tasks": str(len(eff.tasks)), "state": eff.state or "-",
        "cpu": fmt_pct(eff.cpu_eff),
        "mem": f"{fmt_mem(peak)} / {fmt_mem(req)}" + (f" ({fmt_pct(peak / req)})" if peak is not None and req else ""),
        "time": (f"{format_time(int(longest))} / {format_time(int(limit)) if limit else 'n/a'}"
                 + (f" ({fmt_pct(longest / limit)})" if limit else "")) if longest is not None else "n/a",
        "gpu_util": "n/a" if not eff.gpus or util is None else f"{util:.0f}%",
        "gpu_mem": "n/a" if not eff.gpus or eff.gpu_mem_peak_mb is None else fmt_mem(eff.gpu_mem_peak_mb),
        "cpu_h": fmt_hours(eff.cpu_hours), "gpu_h": fmt_hours(eff.gpu_hours),
        "flags": ", ".join(eff.flags) or "-",
    }


COLUMNS = (("stage", "stage"), ("tasks", "tasks"), ("state", "state"), ("cpu", "CPU eff"),
           ("mem", "peak mem / asked"), ("time", "time used / limit"), ("gpu_util", "GPU util"),
           ("gpu_mem", "GPU mem peak"), ("cpu_h", "CPU-h"), ("gpu_h", "GPU-h"), ("flags", "flags"))


def flag_lines(run, eff: RunEfficiency) -> List[str]:
    """``status``'s footer: one short line per flagged stage, then how to right-size."""
    lines = []
    for st in eff.stages.values():
        if st.flags:
            r = row(st)
            detail = []
            if any(f.startswith("mem") for f in st.flags):
                detail.append(f"peak {fmt_mem(st.peak_mem_mb)} of {fmt_mem(st.req_mem_mb)}")
            if any(f.startswith("time") for f in st.flags):
                detail.append(f"ran {format_time(int(st.longest_s or 0))} of {format_time(int(st.limit_s or 0))}")
            if "GPUs idle" in st.flags:
                detail.append(f"GPU util {r['gpu_util']}")
            lines.append(f"! {st.name}: used little: {', '.join(detail)}")
    if lines:
        lines.append(f"  next launch: --resources-from {run.id} (or --right-size)")
    return lines


# -- GPU sampling (in the job, by the engine's heartbeat) ----------------------------------------------
class GpuSampler:
    """Utilisation (%) and used memory (MB) of this process' visible GPUs, from NVML (pynvml) when
    it imports, else ``nvidia-smi``; a running mean of the utilisation and the peak memory. No GPU
    (or neither tool): :meth:`fields` says ``"gpu": "n/a"`` and never a number. Costs one NVML
    query (~1 ms) or one ``nvidia-smi`` call (~50 ms) per heartbeat."""

    def __init__(self) -> None:
        self.samples = 0
        self.util_sum = 0.0
        self.util_last: Optional[float] = None
        self.mem_last: Optional[float] = None
        self.mem_peak: Optional[float] = None
        self.why = ""
        self._nvml = None
        self._handles: List[Any] = []
        self._smi: Optional[str] = None
        self._indices = self._visible()
        if self._indices == []:
            self.why = "no visible GPU"
            return
        try:
            import pynvml  # type: ignore

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            indices = self._indices if self._indices is not None else list(range(count))
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices if i < count]
            self._nvml = pynvml if self._handles else None
        except Exception:  # noqa: BLE001 - no NVML library, no driver: try nvidia-smi
            self._nvml = None
        if self._nvml is None:
            self._smi = shutil.which("nvidia-smi")
            if self._smi is None:
                self.why = "no NVML and no nvidia-smi"

    @staticmethod
    def _visible() -> Optional[List[int]]:
        """The GPU indices CUDA_VISIBLE_DEVICES names ([] for none; None: all, or UUIDs)."""
        text = os.environ.get("CUDA_VISIBLE_DEVICES")
        if text is None:
            return None
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or items == ["-1"]:
            return []
        return [int(t) for t in items] if all(t.isdigit() for t in items) else None

    @property
    def available(self) -> bool:
        return self._nvml is not None or self._smi is not None

    def _read(self) -> Optional[List[Tuple[float, float]]]:
        if self._nvml is not None:
            out = []
            for h in self._handles:
                util = self._nvml.nvmlDeviceGetUtilizationRates(h).gpu
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h).used / (1024 * 1024)
                out.append((float(util), float(mem)))
            return out
        args = [self._smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        if self._indices:
            args.append("--id=" + ",".join(str(i) for i in self._indices))
        proc = subprocess.run(args, capture_output=True, text=True, timeout=5, check=False)
        if proc.returncode != 0:
            return None
        out = []
        for line in proc.stdout.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2:
                try:
                    out.append((float(parts[0]), float(parts[1])))
                except ValueError:
                    continue  # "[N/A]" on some GPUs
        return out or None

    def sample(self) -> None:
        if not self.available:
            return
        try:
            values = self._read()
        except Exception as exc:  # noqa: BLE001 - a driver hiccup must not stop training
            values, self.why = None, f"{type(exc).__name__}: {exc}"[:120]
        if not values:
            self._nvml = self._smi = None  # stop trying: one failure per job at most
            self.why = self.why or "GPU query failed"
            return
        self.util_last = sum(u for u, _ in values) / len(values)
        self.mem_last = max(m for _, m in values)
        self.samples += 1
        self.util_sum += self.util_last
        self.mem_peak = max(self.mem_peak or 0.0, self.mem_last)

    def fields(self) -> Dict[str, Any]:
        """What the heartbeat holds: ``gpu_util``/``gpu_mem_mb`` (last sample), ``gpu_util_mean``,
        ``gpu_mem_peak_mb`` (per GPU: the busiest one), ``gpu_samples``; or ``gpu: "n/a"``."""
        if not self.samples:
            return {"gpu": "n/a", "gpu_why": self.why or "not sampled yet"}
        return {"gpu_util": round(self.util_last, 1), "gpu_mem_mb": round(self.mem_last, 1),
                "gpu_util_mean": round(self.util_sum / self.samples, 1), "gpu_mem_peak_mb": round(self.mem_peak, 1),
                "gpu_samples": self.samples}


# -- right-sizing -------------------------------------------------------------------------------------
@dataclass
class Change:
    stage: str
    field: str  # "mem", "time", "cpus_per_task"
    old: str
    new: str
    why: str

    def line(self) -> str:
        label = {"cpus_per_task": "cpus"}.get(self.field, self.field)
        return f"{self.stage}: {label} {self.old} -> {self.new} ({self.why})"


@dataclass
class StageHistory:
    """What earlier runs say about one stage: the completed runs' peaks, and how its newest run ended."""

    runs: int = 0  # completed runs counted
    peak_mem_mb: Optional[float] = None
    needed_s: Optional[float] = None
    cpus_used: Optional[float] = None  # CPUs per task actually used (TotalCPU / Elapsed / tasks)
    last_state: str = ""  # the newest run's state of the stage
    last_mem_mb: Optional[float] = None  # what that run asked
    last_limit_s: Optional[float] = None

    def add_completed(self, eff: StageEfficiency) -> None:
        self.runs += 1
        if eff.peak_mem_mb is not None:
            self.peak_mem_mb = max(self.peak_mem_mb or 0.0, eff.peak_mem_mb)
        if eff.needed_s is not None:
            self.needed_s = max(self.needed_s or 0.0, eff.needed_s)
        cpt = int(eff.resources.get("cpus_per_task") or 1)
        if eff.cpu_eff is not None:
            self.cpus_used = max(self.cpus_used or 0.0, eff.cpu_eff * cpt)


def histories(effs: Sequence[RunEfficiency]) -> Dict[str, StageHistory]:
    """Stage -> its history over runs given newest first."""
    out: Dict[str, StageHistory] = {}
    for eff in effs:
        for name, st in eff.stages.items():
            h = out.setdefault(name, StageHistory())
            if not st.tasks:
                continue
            if not h.last_state:
                h.last_state = st.state
                h.last_mem_mb, h.last_limit_s = st.req_mem_mb, st.limit_s
            if st.state == "COMPLETED":
                h.add_completed(st)
    return out


def round_mem_mb(mb: float) -> int:
    """Up to a multiple of 64M under 1G, 256M under 8G, else 1G."""
    step = 64 if mb <= 1024 else 256 if mb <= 8192 else 1024
    return int(math.ceil(mb / step) * step)


def fmt_mem_request(mb: int) -> str:
    """An sbatch ``--mem`` value: ``384M``, ``6G``."""
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


@dataclass
class Limits:
    """A partition's ceiling for one stage (None: unknown / unlimited)."""

    partition: str = ""
    mem_mb: Optional[int] = None
    time_s: Optional[int] = None
    cpus: Optional[int] = None


def plan_stage(name: str, res, hist: StageHistory, limits: Limits) -> Tuple[Dict[str, Any], List[Change]]:
    """The new ``mem``/``time``/``cpus_per_task`` of one stage (``res``: its Resources now) and
    each change with its reason. Pure arithmetic: the unit tests call it directly."""
    changes: List[Change] = []
    new: Dict[str, Any] = {}
    over = f" runs" if hist.runs != 1 else " run"
    cap_note = lambda v, cap, what: (v, "") if cap is None or v <= cap else (cap, f", capped at partition {limits.partition}'s {what}")  # noqa: E731
    # memory
    old_mb = parse_mem_mb(res.mem) if res.mem else None
    mem_mb, why = None, ""
    if hist.last_state == "OUT_OF_MEMORY":
        base = hist.last_mem_mb or old_mb
        if base:
            mem_mb = round_mem_mb(base * FAILED_FACTOR)
            why = f"the last run was OUT_OF_MEMORY at {fmt_mem(base)}: x{FAILED_FACTOR}"
    elif hist.peak_mem_mb is not None and hist.runs:
        mem_mb = max(MIN_MEM_MB, round_mem_mb(hist.peak_mem_mb * MEM_MARGIN))
        why = f"peak {fmt_mem(hist.peak_mem_mb)} over {hist.runs}{over}"
    if mem_mb is not None:
        mem_mb, note = cap_note(mem_mb, limits.mem_mb, f"{fmt_mem(limits.mem_mb)} per node")
        if hist.peak_mem_mb is not None and mem_mb < hist.peak_mem_mb:
            mem_mb = int(math.ceil(hist.peak_mem_mb))  # never below what a run needed
        if old_mb is None or mem_mb != old_mb:
            new["mem"] = fmt_mem_request(mem_mb)
            changes.append(Change(name, "mem", res.mem or "default", new["mem"], why + note))
    # time
    old_s = res.time_seconds
    time_s, why = None, ""
    if hist.last_state == "TIMEOUT":
        base = hist.last_limit_s or old_s
        time_s = int(base * FAILED_FACTOR)
        why = f"the last run hit its time limit {format_time(int(base))}: x{FAILED_FACTOR}"
    elif hist.needed_s is not None and hist.runs:
        time_s = int(math.ceil((hist.needed_s * TIME_MARGIN + TIME_EXTRA_S) / 60.0) * 60)
        why = f"longest {format_time(int(hist.needed_s))} over {hist.runs}{over}"
    if time_s is not None:
        time_s, note = cap_note(time_s, limits.time_s, f"time limit {format_time(limits.time_s or 0)}")
        if hist.needed_s is not None and time_s < hist.needed_s:
            time_s = int(math.ceil(hist.needed_s))
        if time_s != old_s:
            new["time"] = format_time(time_s)
            changes.append(Change(name, "time", format_time(old_s), new["time"], why + note))
    # CPUs per task: only fewer (more CPUs help only a job that can use them)
    if hist.cpus_used is not None and hist.runs and hist.last_state not in ("OUT_OF_MEMORY", "TIMEOUT"):
        cpus = max(1, int(math.ceil(hist.cpus_used * CPU_MARGIN)))
        if limits.cpus:
            cpus = min(cpus, limits.cpus)
        if cpus < res.cpus_per_task:
            new["cpus_per_task"] = cpus
            changes.append(Change(name, "cpus_per_task", str(res.cpus_per_task), str(cpus),
                                  f"{hist.cpus_used:.2f} CPUs used over {hist.runs}{over}"))
    return new, changes


def earlier_runs(runs_root, workflow: str, preset: Optional[str], cluster: str, limit: int = HISTORY_RUNS) -> List[Any]:
    """The newest earlier runs of ``workflow`` with ``preset`` on ``cluster`` under ``runs_root``
    that ran on Slurm (not dry runs, not debug runs), newest first."""
    from pathlib import Path

    from .ledger import Run

    root = Path(runs_root) / workflow
    found = []
    try:
        dirs = [d for d in root.iterdir() if (d / "run.json").is_file()]
    except OSError:
        return []
    for d in dirs:
        run = Run(d)
        rec = run.record
        if run.damaged or rec.get("dry_run") or rec.get("debug") or run.backend != "slurm":
            continue
        if rec.get("cluster") != cluster or rec.get("preset") != preset:
            continue
        found.append(run)
    found.sort(key=lambda r: str(r.record.get("created") or ""), reverse=True)
    return found[:limit]


def right_size(pipeline, history_runs: Sequence[Any], limits_for: Callable[[Any], Limits],
               keep: Callable[[str, str], bool] = lambda stage, field: False) -> Tuple[List[Change], List[str]]:
    """Set each batch stage's resources from ``history_runs`` (newest first); return the changes and
    notes (stages without history, where the figures came from). ``keep(stage, field)``: a value
    the user gave on the command line, left as it is."""
    import dataclasses

    effs = for_runs(list(history_runs))
    ordered = [effs[r.id] for r in history_runs if r.id in effs]
    notes = [f"right-size: {e.source}" for e in ordered[:1] if e.source != "sacct"]
    hist = histories(ordered)
    changes: List[Change] = []
    for stage in pipeline:
        if stage.where != "batch":
            continue
        h = hist.get(stage.name)
        if h is None or (not h.runs and h.last_state not in ("OUT_OF_MEMORY", "TIMEOUT")):
            notes.append(f"{stage.name}: unchanged (no completed run to size it from)")
            continue
        new, stage_changes = plan_stage(stage.name, stage.resources, h, limits_for(stage))
        if h.peak_mem_mb is None and h.last_state != "OUT_OF_MEMORY":
            notes.append(f"{stage.name}: mem unchanged (sacct has no MaxRSS sample: a job shorter than "
                         f"JobAcctGatherFrequency; --sbatch acctg-freq=5 samples more often)")
        for c in [c for c in stage_changes if keep(stage.name, c.field)]:
            stage_changes.remove(c)
            new.pop(c.field, None)
            notes.append(f"{stage.name}: {c.field} kept as given on the command line (would be {c.new})")
        if new:
            stage.resources = dataclasses.replace(stage.resources, **new)
            stage.resources.validate(f"right-sizing stage '{stage.name}'")
        changes += stage_changes
    return changes, notes
