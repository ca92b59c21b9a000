"""One scheduler poller per user: every status read goes through here.

The problem it solves: a ``sacct`` per job every few seconds, from every terminal that watches a
run, floods the controller. Here, every process of one user (every ``status``, ``status --watch``,
``logs -f``, ``launch --follow``, ``resume``) shares ONE on-disk answer, and the scheduler is asked
at most once per interval, with all the watched jobs in one call:

* **What is asked.** ``sacct -X --parsable2 -j ID,ID,...`` with the base ids (an array is one id)
  of every job some process asked about that is not settled yet (a job whose final state has been
  seen for ``settle_s`` is never asked about again). Right after a submission ``sacct`` can lag a
  second: the ids it does not know are taken from ONE ``squeue -u USER -t all`` call. When
  accounting is off (``sacct`` fails) the poller uses only that ``squeue`` call for
  ``sacct_retry_s`` before trying ``sacct`` again. So a refresh is one call (two while sacct lags),
  whatever the number of jobs.
* **What is cached, where.** ``$HPC_JOBS_HOME/cache/scheduler-<user>-<cluster>.json``: every
  job's last answer (state, raw state, elapsed, exit code, node, reason, when seen), the watched
  base ids, the time of the last call and the current interval. Written atomically (temp file +
  rename, mode 0600); refreshes are serialised by ``flock`` on ``...lock`` next to it, and a
  process that waited for the lock re-reads the file first, so two processes never both call.
* **Backoff.** After a call that saw a change (a new job, a new state, node or exit code) the
  interval is ``min_interval_s`` (2 s); every call that saw nothing new doubles it, up to
  ``max_interval_s`` (30 s): 2, 4, 8, 16, 30, 30, ... So in steady state there is at most one call
  per 30 s per user. A caller may ask for an ``urgent`` read (status does when a stage's own
  marker disagrees with the cached state, e.g. the stage wrote COMPLETED while the cache still says
  RUNNING) and :func:`invalidate` resets the backoff (call it after a submission, cancel or
  resume); both still wait ``min_interval_s`` since the last call. Ids never asked before are
  asked at the next call after ``min_interval_s`` too.
* **Quiet: the jobs report themselves.** A caller that can see every watched job in its own
  files (:mod:`hpc_jobs.status`: a pending job's start, a running job's end, failure or requeue
  are written by the job into its marker and attempt log, and ``status`` shows them from there at
  once) asks with ``quiet=True``; the scheduler is then asked only every ``quiet_interval_s``
  (600 s, submitit's own longest interval), for what no job can report: an admin's ``scancel``,
  a job that died before it could write. New ids, :func:`invalidate` and ``urgent`` reads still
  ask after ``min_interval_s``, and one loud reader (any process) refreshes the shared answer for
  every reader.
* **Unknown is not dead.** A job missing from the answers is UNKNOWN; the stage's marker file then
  tells how it ended (:mod:`hpc_jobs.status`).

Settings: ``HPC_JOBS_POLL_MIN_S`` (default 2), ``HPC_JOBS_POLL_MAX_S`` (default 30),
``HPC_JOBS_POLL_QUIET_S`` (default 600), or a :class:`PollerConfig` passed to :class:`Poller`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set

from .fsutil import atomic_write_json
from .slurm import ACTIVE_STATES, FINAL_STATES, JobInfo

CACHE_VERSION = 1


@dataclass
class PollerConfig:
    min_interval_s: float = 2.0  # right after a change / submission / invalidate
    max_interval_s: float = 30.0  # steady state: at most one call per this many seconds
    quiet_interval_s: float = 600.0  # every watched job reports itself (quiet=True): one call per this
    settle_s: float = 120.0  # keep asking about a finished job this long (a NODE_FAIL can be requeued)
    forget_s: float = 7 * 86400.0  # drop cached answers older than this
    unwatch_s: float = 86400.0  # stop asking about ids nobody asked about for this long
    sacct_retry_s: float = 600.0  # accounting is off: use squeue only for this long, then try sacct again
    sacct_hiccup_s: float = 30.0  # sacct failed once (slurmdbd busy): squeue only for this long
    lock_timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> "PollerConfig":
        cfg = cls()
        for attr, var in (("min_interval_s", "HPC_JOBS_POLL_MIN_S"), ("max_interval_s", "HPC_JOBS_POLL_MAX_S"),
                          ("quiet_interval_s", "HPC_JOBS_POLL_QUIET_S")):
            value = os.environ.get(var)
            if value:
                try:
                    setattr(cfg, attr, max(0.0, float(value)))
                except ValueError:
                    pass
        cfg.max_interval_s = max(cfg.max_interval_s, cfg.min_interval_s)
        cfg.quiet_interval_s = max(cfg.quiet_interval_s, cfg.min_interval_s)
        return cfg


@dataclass
class Snapshot:
    """What the poller knows about the ids asked for."""

    jobs: Dict[str, JobInfo]  # id -> answer (ids the scheduler did not report are absent)
    pending: Set[str] = field(default_factory=set)  # base ids not asked about yet
    age_s: float = 0.0  # seconds since the answer was fetched
    source: str = ""  # "sacct", "squeue", "sacct+squeue" or "" (never asked)
    called: bool = False  # this read made a scheduler call

    def get(self, job_id: str) -> Optional[JobInfo]:
        return self.jobs.get(job_id) or self.jobs.get(str(job_id).split("_")[0])


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid())


def cluster_key() -> str:
    """The cluster's name from slurm.conf (no controller call), so one shared home directory can
    serve several clusters without mixing their job ids."""
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    try:
        with open(conf) as fh:
            for line in fh:
                match = re.match(r"^\s*ClusterName\s*=\s*(\S+)", line, re.IGNORECASE)
                if match:
                    return re.sub(r"[^A-Za-z0-9_.-]", "_", match.group(1))
    except OSError:
        pass
    return "default"


def default_cache_path() -> Path:
    from .profiles import hpc_jobs_home

    return hpc_jobs_home() / "cache" / f"scheduler-{_user()}-{cluster_key()}.json"


def _empty() -> Dict:
    return {"version": CACHE_VERSION, "last_call": 0.0, "interval": None, "invalidated": False,
            "source": "", "sacct_failed_at": None, "calls": 0, "call_times": [], "jobs": {}, "watch": {}}


def _to_row(info: JobInfo, now: float, prev: Optional[list]) -> list:
    final_since = None
    if info.state in FINAL_STATES:
        final_since = prev[7] if prev and prev[0] == info.state and prev[7] else now
    return [info.state, info.raw_state, info.elapsed, info.exit_code, info.node, info.reason, now, final_since]


def _from_row(job_id: str, row: list, now: float) -> JobInfo:
    state, raw, elapsed, exit_code, node, reason, seen = row[:7]
    if state == "RUNNING" and elapsed:  # extrapolate the running time from the cached answer
        from .slurm import format_elapsed, parse_elapsed

        secs = parse_elapsed(elapsed)
        if secs is not None:
            elapsed = format_elapsed(secs + max(0.0, now - float(seen)))
    return JobInfo(job_id, state, raw, elapsed, exit_code, node, reason)


def _base(job_id: str) -> str:
    return str(job_id).split("_")[0]


class Poller:
    """A user's shared scheduler cache. ``scheduler`` (for tests) replaces the real calls: a
    function ``(base_ids, use_sacct) -> (answers, source)``."""

    def __init__(self, cache_path: Optional[Path] = None, config: Optional[PollerConfig] = None,
                 clock: Callable[[], float] = time.time, scheduler: Optional[Callable] = None):
        self.path = Path(cache_path) if cache_path else default_cache_path()
        self.lock_path = self.path.with_suffix(".lock")
        self.config = config or PollerConfig.from_env()
        self.clock = clock
        self.scheduler = scheduler or _real_scheduler

    # -- the cache file -------------------------------------------------------------------------
    def load(self) -> Dict:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return _empty()
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return _empty()
        for key, value in _empty().items():
            data.setdefault(key, value)
        return data

    def _save(self, data: Dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.path.parent, 0o700)
        atomic_write_json(self.path, data, mode=0o600, fsync=False)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """flock the lock file (waiting); on a file system without locks, go on without."""
        import fcntl

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self.config.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break  # a stuck holder: do not hang a status command forever
                    time.sleep(0.05)
                except OSError:
                    break  # no locking on this file system
            yield
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------------------
    def _due(self, data: Dict, bases: Set[str], urgent: bool, now: float, quiet: bool = False) -> bool:
        cfg = self.config
        watch = data["watch"]
        new = [b for b in bases if not watch.get(b, {}).get("answered")]
        since = now - float(data.get("last_call") or 0.0)
        if new or data.get("invalidated") or urgent:
            return since >= cfg.min_interval_s
        index = _by_base(data["jobs"])
        if all(self._settled(data, index, b, now) for b in bases):
            return False  # everything asked about has finished for good: never call again
        if quiet:  # the jobs report their own changes: the scheduler only for outside ones
            return since >= max(cfg.quiet_interval_s, cfg.min_interval_s)
        interval = data.get("interval")
        interval = cfg.min_interval_s if interval is None else min(float(interval), cfg.max_interval_s)
        return since >= interval

    def _settled(self, data: Dict, index: Dict[str, List[str]], base: str, now: float) -> bool:
        rows = [data["jobs"][j] for j in index.get(base, [])]
        if not rows:
            return False
        return all(row[0] in FINAL_STATES and row[7] and now - float(row[7]) >= self.config.settle_s for row in rows)

    def query(self, job_ids: Iterable[str], urgent: bool = False, quiet: bool = False) -> Snapshot:
        """The states of ``job_ids`` (``123`` or ``123_4``): from the shared cache, refreshed
        first (with ONE call for every watched job) when the interval has passed. ``quiet``: the
        caller sees every change these jobs make in their own files; the interval is then
        ``quiet_interval_s``."""
        ids = sorted({str(j) for j in job_ids if j})
        if not ids:
            return Snapshot({})
        bases = {_base(j) for j in ids}
        now = self.clock()
        data = self.load()
        called = False
        if self._due(data, bases, urgent, now, quiet):
            with self._locked():
                data = self.load()  # another process may have refreshed while we waited
                now = self.clock()
                self._watch(data, bases, now)
                if self._due(data, bases, urgent, now, quiet):
                    self._refresh(data, now)
                    called = True
                self._save(data)
        elif any(b not in data["watch"] or now - data["watch"][b].get("asked", 0) > 60 for b in bases):
            with self._locked():  # remember who is watched (cheap; no scheduler call)
                data = self.load()
                self._watch(data, bases, now)
                self._save(data)
        return self._view(data, ids, now, called)

    def _watch(self, data: Dict, bases: Set[str], now: float) -> None:
        for b in bases:
            entry = data["watch"].setdefault(b, {"added": now})
            entry["asked"] = now

    def _view(self, data: Dict, ids: List[str], now: float, called: bool) -> Snapshot:
        jobs: Dict[str, JobInfo] = {}
        rows = data["jobs"]
        for jid in ids:
            row = rows.get(jid)
            if row is None and "_" in jid:
                row = rows.get(_base(jid))  # a plain job asked about as job_0, or a whole-array row
            if row is not None:
                jobs[jid] = _from_row(jid, row, now)
        pending = {_base(j) for j in ids if not data["watch"].get(_base(j), {}).get("answered")}
        last = float(data.get("last_call") or 0.0)
        return Snapshot(jobs, pending, age_s=(now - last) if last else float("inf"),
                        source=data.get("source", ""), called=called)

    # -- refreshing -----------------------------------------------------------------------------
    def _refresh(self, data: Dict, now: float) -> None:
        cfg = self.config
        watch = data["watch"]
        rows = data["jobs"]
        for b in [b for b, e in watch.items() if now - e.get("asked", e.get("added", 0)) > cfg.unwatch_s]:
            del watch[b]
        index = _by_base(rows)
        active = sorted((b for b in watch if not self._settled(data, index, b, now)), key=lambda b: (len(b), b))
        failed_at = data.get("sacct_failed_at")
        retry = cfg.sacct_retry_s if data.get("accounting_off") else cfg.sacct_hiccup_s
        use_sacct = not failed_at or now - float(failed_at) >= retry
        answers, source, sacct_ok, n_calls = self.scheduler(active, use_sacct)
        if use_sacct and not sacct_ok and active:
            from . import slurm

            data["sacct_failed_at"] = now
            data["sacct_error"] = slurm.last_sacct_error
            data["accounting_off"] = slurm.accounting_disabled(slurm.last_sacct_error)
        elif sacct_ok:
            data["sacct_failed_at"] = None
            data["accounting_off"] = False
        changed = False
        answered_bases = set()
        for jid, info in answers.items():
            b = _base(jid)
            if b not in watch:
                continue  # squeue answers for all of the user's jobs: keep ours only
            answered_bases.add(b)
            prev = rows.get(jid)
            if source == "squeue" and prev and prev[0] == info.state and prev[0] in FINAL_STATES:
                prev[6] = now  # keep sacct's richer record (exit code, Slurm-format elapsed)
                continue
            row = _to_row(info, now, prev)
            if prev is None or prev[:2] != row[:2] or prev[3:6] != row[3:6]:
                changed = True
            rows[jid] = row
        index = _by_base(rows)
        for b in active:
            if b in answered_bases:
                continue
            # asked, not reported: UNKNOWN (never "dead"); the stage's marker decides
            for jid in index.get(b, []):
                if rows[jid][0] not in FINAL_STATES and rows[jid][0] != "UNKNOWN":
                    rows[jid] = ["UNKNOWN", "", "", "", "", "", now, None]
                    changed = True
        for b in active:
            if not watch[b].get("answered"):
                watch[b]["answered"] = now
                changed = True
        for jid in [j for j, row in rows.items() if now - float(row[6]) > cfg.forget_s and _base(j) not in watch]:
            del rows[jid]
        interval = data.get("interval")
        if changed or interval is None or data.get("invalidated"):
            data["interval"] = cfg.min_interval_s
        else:
            data["interval"] = min(cfg.max_interval_s, max(cfg.min_interval_s, float(interval) * 2))
        data["invalidated"] = False
        data["last_call"] = now
        if source:
            data["source"] = source
        data["calls"] = int(data.get("calls", 0)) + n_calls
        data["call_times"] = ([t for t in data.get("call_times", []) if now - t < 3600] + [now] * n_calls)[-2000:]

    # -- hints from writers ---------------------------------------------------------------------
    def invalidate(self) -> None:
        """Something changed (a submission, cancel, resume): reset the backoff, so the next read
        after ``min_interval_s`` asks the scheduler."""
        with self._locked():
            data = self.load()
            data["invalidated"] = True
            self._save(data)

    def stats(self) -> Dict[str, float]:
        data = self.load()
        now = self.clock()
        return {"calls": data.get("calls", 0),
                "calls_last_hour": len([t for t in data.get("call_times", []) if now - t < 3600]),
                "interval_s": data.get("interval") or self.config.min_interval_s,
                "watched": len(data.get("watch", {})), "jobs": len(data.get("jobs", {}))}


def _by_base(rows: Dict[str, list]) -> Dict[str, List[str]]:
    index: Dict[str, List[str]] = {}
    for jid in rows:
        index.setdefault(_base(jid), []).append(jid)
    return index


def _real_scheduler(base_ids: List[str], use_sacct: bool):
    """ONE sacct call for the ids (plus ONE squeue for the ids sacct does not know yet); or ONE
    squeue when accounting is off. Returns (answers, source, sacct_answered, calls made)."""
    from . import slurm

    if not base_ids:
        return {}, "", False, 0
    answers: Optional[Dict[str, JobInfo]] = slurm.sacct_jobs(base_ids) if use_sacct else None
    if answers is None:
        return slurm.squeue_user() or {}, "squeue", False, 2 if use_sacct else 1
    known = {_base(j) for j in answers}
    missing = set(b for b in base_ids if b not in known)
    # a NODE_FAIL job that Slurm requeued keeps its NODE_FAIL record in sacct while it waits in the
    # queue: squeue, which lists it PENDING, is right then (else a resume would submit it twice)
    node_fail = {j for j, i in answers.items() if i.state == "NODE_FAIL"}
    if missing or node_fail:  # and sacct lags squeue by a second right after a submission
        extra = slurm.squeue_user() or {}
        for jid, info in extra.items():
            if _base(jid) in missing:
                answers[jid] = info
            elif jid in node_fail and info.state in ACTIVE_STATES:
                answers[jid] = info
        return answers, "sacct+squeue", True, 2
    return answers, "sacct", True, 1


_DEFAULT: Optional[Poller] = None


def default() -> Poller:
    """The process's poller on the default cache path (re-created when HPC_JOBS_HOME changes)."""
    global _DEFAULT
    path = default_cache_path()
    if _DEFAULT is None or _DEFAULT.path != path:
        _DEFAULT = Poller(path)
    return _DEFAULT


def query(job_ids: Iterable[str], urgent: bool = False, quiet: bool = False) -> Snapshot:
    return default().query(job_ids, urgent=urgent, quiet=quiet)


def invalidate() -> None:
    """For launch/resume/cancel: call after submitting or cancelling jobs. Never raises."""
    with contextlib.suppress(Exception):
        default().invalidate()
