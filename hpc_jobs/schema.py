"""The one JSON shape of a run, for every ``--json`` (launch, status, resume, report).

``hpc-jobs/run/v1`` (docs/monitoring.md lists every key)::

    {"schema": "hpc-jobs/run/v1", "run", "run_dir", "workflow", "backend", "cluster", "preset",
     "created", "dry_run", "debug", "finished": bool, "ok": bool, "failed": [stage, ...],
     "stages": [{"name", "where", "state", "job_ids", "depends_on", "array", "script", "elapsed",
                 "node", "exit_code", "raw_state", "reason", "error", "result", "metric",
                 "progress", "handoff", "interruptions", "tasks", "task_list", "hint",
                 "log_tail", "log_file", "efficiency"}, ...],
     "efficiency": {"source", "cpu_hours", "gpu_hours"}}

A stage's ``efficiency`` (:mod:`hpc_jobs.efficiency`, null until its jobs ended on Slurm):
``cpu_efficiency peak_mem_mb req_mem_mb longest_s limit_s gpus gpu_util_mean gpu_mem_peak_mb
cpu_hours gpu_hours flags tasks task_list``; null figures are not measured ("n/a").

``status --json`` without a run lists ``{"schema": "hpc-jobs/runs/v1", "runs": [...]}`` with each
run's identity, ``stages`` (state -> count) and ``damaged``. A key is never renamed within a
version; new keys may be added.
"""

from __future__ import annotations

from typing import Any, Dict, List

RUN_SCHEMA = "hpc-jobs/run/v1"
RUNS_SCHEMA = "hpc-jobs/runs/v1"


def run_document(run: Any, states: Dict[str, Any]) -> Dict[str, Any]:
    """A run and its stages' states (``status.stage_states``) as one JSON-able dict."""
    from . import efficiency
    from . import states as statesmod
    from .status import run_finished

    eff = efficiency.for_run(run, states)
    stages: List[Dict[str, Any]] = []
    for name, st in states.items():
        rec = run.stage(name)
        entry = st.as_dict()
        entry.update(depends_on=list(rec.depends_on), array=rec.array, script=rec.script,
                     efficiency=eff.stages[name].as_dict() if name in eff.stages and eff.stages[name].tasks else None)
        stages.append(entry)
    values = [st.state for st in states.values()]
    return {
        "schema": RUN_SCHEMA,
        "run": run.id, "run_dir": str(run.dir), "workflow": run.workflow,
        "backend": run.record.get("backend"), "cluster": run.record.get("cluster"),
        "preset": run.record.get("preset"), "created": run.record.get("created"),
        "dry_run": bool(run.record.get("dry_run")), "debug": bool(run.record.get("debug")),
        "finished": run_finished(states),
        "ok": bool(values) and all(v in statesmod.DONE for v in values),
        "failed": [st.name for st in states.values() if st.state in statesmod.FAILED],
        "stages": stages,
        "sweep": _sweep(run, states),
        "efficiency": {"source": eff.source, "cpu_hours": round(eff.cpu_hours, 4),
                       "gpu_hours": round(eff.gpu_hours, 4)},
    }


def _sweep(run: Any, states: Dict[str, Any]) -> Any:
    record = run.record.get("sweep")
    if not record:
        return None
    from .sweep import rows

    return {"keys": record.get("keys"), "metric": record.get("metric"), "mode": record.get("mode"),
            "stages": record.get("stages"), "points": rows(record, states)}


def runs_document(listing: List[Any]) -> Dict[str, Any]:
    """``[(run, {state: count})]`` -> the recent-runs listing."""
    return {"schema": RUNS_SCHEMA, "runs": [
        {"run": r.id, "workflow": r.workflow, "run_dir": str(r.dir), "cluster": r.record.get("cluster"),
         "created": r.record.get("created"), "stages": counts, "damaged": r.damaged} for r, counts in listing]}


def stage_document(run: Any, st: Any) -> Dict[str, Any]:
    """``status RUN STAGE --json``: one stage as in ``run_document``, its efficiency (per task in
    ``efficiency.task_list``) included once the stage has ended."""
    from . import efficiency

    rec = run.stage(st.name)
    eff = efficiency.for_run(run, {st.name: st}).stages.get(st.name)
    entry = st.as_dict()
    entry.update(schema=RUN_SCHEMA + "#stage", run=run.id, depends_on=list(rec.depends_on), array=rec.array,
                 script=rec.script, efficiency=eff.as_dict() if eff is not None and eff.tasks else None)
    return entry
