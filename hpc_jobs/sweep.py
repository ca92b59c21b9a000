"""Config sweeps as arrays: ``--sweep lr=1e-3,3e-4 --sweep batch_size=4,8`` runs a pipeline once per
point of the grid without one job per point.

The stages that do not depend on the swept values (download, prepare) run once. From the sweep's
first stage on (``--sweep-from STAGE``, default the workflow's ``sweep_from``, else its first GPU
stage) every stage becomes an array of one task per point, and each edge between two swept stages
becomes per-task (aftercorr): point k's ``eval`` starts when point k's ``train`` is done, and a failed
point stops only itself. Task k of a swept stage runs with point k's config. ``resume`` reruns only
the points that did not complete; ``status`` shows one row per point, sorted by its final metric.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .errors import UserError
from .spec import Pipeline


@dataclass
class Sweep:
    keys: List[str]
    points: List[Dict[str, Any]]  # one {key: value} per point, in task order
    stages: List[str] = field(default_factory=list)  # the swept stages (arrays of len(points) tasks)
    start: str = ""  # the first swept stage
    metric: Optional[str] = None  # the result key that ranks the points
    mode: str = "max"

    def to_record(self) -> Dict[str, Any]:
        return {"keys": self.keys, "points": self.points, "stages": self.stages, "from": self.start,
                "metric": self.metric, "mode": self.mode}


def parse(specs: Sequence[str]) -> Optional[Sweep]:
    """``["lr=1e-3,3e-4", "batch_size=4,8"]`` -> the grid (YAML scalars, later keys vary fastest)."""
    if not specs:
        return None
    from .config import _scalar

    axes: Dict[str, List[Any]] = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        items = [v.strip() for v in values.split(",")]
        if not eq or not key or not values.strip() or any(v == "" for v in items):
            raise UserError(f"--sweep '{spec}' is not KEY=V1,V2,... (e.g. --sweep learning_rate=1e-3,3e-4)")
        if key in axes:
            raise UserError(f"--sweep: '{key}' is given twice: put all its values in one --sweep {key}=...")
        axes[key] = [_number(_scalar(v)) for v in items]
    keys = list(axes)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]
    return Sweep(keys=keys, points=points)


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: a value that is a number reads as one."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def first_swept_stage(pipeline: Pipeline, wanted: Optional[str], default: Optional[str]) -> str:
    if wanted:
        if wanted not in pipeline.stages:
            raise UserError(f"--sweep-from '{wanted}': no such stage (stages: {', '.join(pipeline.order)})")
        return wanted
    if default and default in pipeline.stages:
        return default
    gpu = [s.name for s in pipeline if s.where == "batch" and s.resources.uses_gpus]
    if gpu:
        return gpu[0]
    raise UserError("--sweep: this workflow has no GPU stage to start the sweep from: give --sweep-from STAGE "
                    f"(stages: {', '.join(pipeline.order)})")


def apply(pipeline: Pipeline, sweep: Sweep, start: str, parallelism: Optional[int]) -> None:
    """Turn ``start`` and every stage below it into arrays of one task per point (in place)."""
    swept = [start] + pipeline.descendants([start])
    n = len(sweep.points)
    for name in swept:
        stage = pipeline[name]
        if stage.where != "batch":
            raise UserError(f"--sweep: stage '{name}' runs on the login node and cannot be swept: "
                            f"start the sweep below it (--sweep-from)")
        if stage.array is not None:
            raise UserError(f"--sweep: stage '{name}' is already an array of {stage.array} tasks; a sweep over an "
                            f"array is not supported: start the sweep below it (--sweep-from)")
    for name in swept:
        stage = pipeline[name]
        stage.array = n
        stage.array_parallelism = parallelism
        stage.inputs = {k: (dataclasses.replace(i, per_task=True) if i.stage in swept else i)
                        for k, i in stage.inputs.items()}
    sweep.stages, sweep.start = swept, start


def check_keys(sweep: Sweep, known: Sequence[str]) -> None:
    unknown = [k for k in sweep.keys if k not in known]
    if unknown:
        raise UserError(f"--sweep: unknown config key '{unknown[0]}'; valid keys: {', '.join(sorted(known))}")


def rows(record: Mapping[str, Any], states: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """One row per point: its values, its state (the worst of its tasks), its final metric; best
    first (``mode``), points without a metric last."""
    from . import states as statesmod

    stages = [s for s in record.get("stages", []) if s in states]
    out = []
    for k, point in enumerate(record.get("points", [])):
        task_states = []
        for name in stages:
            tasks = {t.index: t for t in states[name].task_list}
            task_states.append(tasks[k].state if k in tasks else "UNKNOWN")
        last = {t.index: t for t in states[stages[-1]].task_list}.get(k) if stages else None
        found = headline(last.result if last else None, record.get("metric"))
        out.append({"index": k, "values": dict(point), "state": statesmod.aggregate(task_states),
                    "metric": found[0] if found else None, "value": found[1] if found else None})
    sign = -1 if record.get("mode", "max") == "max" else 1
    return sorted(out, key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0), r["index"]))


def point_label(point: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def headline(result: Any, metric: Optional[str]) -> Optional[tuple]:
    """``(name, value)`` of a point's final result: ``metric`` when given, else its first number."""
    if not isinstance(result, dict):
        return None
    if metric and isinstance(result.get(metric), (int, float)):
        return metric, float(result[metric])
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None
