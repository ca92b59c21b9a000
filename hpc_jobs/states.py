"""The one table of hpc-jobs stage and task states, and their groupings.

Slurm's own words map onto these in :data:`hpc_jobs.slurm.STATE_TABLE`; everything else (status,
launch, resume, the runtime, the CLI) asks this module which group a state belongs to.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

#: state -> (group, what it means). Groups: ``planned`` (nothing asked of a scheduler yet),
#: ``active`` (queued or running), ``done``, ``failed`` (ended without completing), ``unknown``.
STATES: Dict[str, Tuple[str, str]] = {
    "PLANNED": ("planned", "recorded, not submitted yet"),
    "WAITING_LOGIN": ("planned", "a login-node step waiting for its parents; `resume RUN` on the login node runs it"),
    "SUBMITTED": ("active", "handed to the scheduler, not seen by it yet"),
    "PENDING": ("active", "queued"),
    "RUNNING": ("active", "running"),
    "REQUEUED": ("active", "requeued (signal, time limit or preemption), will run again"),
    "PREEMPTED": ("active", "preempted, will run again"),
    "COMPLETED": ("done", "finished successfully"),
    "SKIPPED": ("done", "not part of this (debug) run"),
    "FAILED": ("failed", "the stage raised or exited non-zero"),
    "TIMEOUT": ("failed", "killed at its time limit"),
    "OUT_OF_MEMORY": ("failed", "killed for using more memory than asked"),
    "NODE_FAIL": ("failed", "its node failed"),
    "CANCELLED": ("failed", "cancelled (by a user, or because a parent failed)"),
    "UNKNOWN": ("unknown", "neither the scheduler nor the stage's own marker knows"),
}

ACTIVE = frozenset(s for s, (g, _) in STATES.items() if g == "active")
FAILED = frozenset(s for s, (g, _) in STATES.items() if g == "failed")
DONE = frozenset(s for s, (g, _) in STATES.items() if g == "done")
PLANNED = frozenset(s for s, (g, _) in STATES.items() if g == "planned")
#: a state that will not change without a user's action (resume, cancel)
FINAL = DONE | FAILED


def group(state: str) -> str:
    return STATES.get(state, ("unknown", ""))[0]


def aggregate(states: Iterable[str]) -> str:
    """One state for the tasks of an array: COMPLETED when all are; else the most active one
    (RUNNING before REQUEUED before PENDING...); else the worst failure."""
    values = list(states)
    if not values:
        return "UNKNOWN"
    if all(s in DONE for s in values):
        return "COMPLETED"
    for active in ("RUNNING", "REQUEUED", "PREEMPTED", "PENDING", "SUBMITTED", "WAITING_LOGIN", "PLANNED"):
        if active in values:
            return active
    for bad in ("OUT_OF_MEMORY", "NODE_FAIL", "TIMEOUT", "FAILED", "CANCELLED"):
        if bad in values:
            return bad
    return "UNKNOWN"


def counts_text(states: Iterable[str]) -> str:
    """``7 tasks: 5 COMPLETED, 2 RUNNING`` (most frequent first)."""
    values = list(states)
    counts: Dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{len(values)} tasks: " + ", ".join(f"{n} {s}" for s, n in ordered)
