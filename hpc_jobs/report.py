"""``python launch.py report RUN``: one page about a run (``report.md``, or ``report.html``).

The page, in this order: the headline metric (the workflow's final result: the last completed
stage's ``metrics.json``, else its marker's result, naming the stage), the run's identity
(workflow, run id, cluster, preset, git commit and whether it was dirty, command, created, wall
time), the stage timeline (a Gantt of queue wait and run time per stage, and per task of an
array stage), the curves (drawn from every ``metrics.csv`` a stage or array task wrote: train and
validation metrics each on its own axis, the best step marked; plus any other ``*.png`` a stage
wrote), the stage table (state, jobs, node, elapsed, exit code, handoff, last metric), the
efficiency table (CPU efficiency, peak memory and time vs asked, GPU use, CPU- and GPU-hours per
stage and in total: :mod:`hpc_jobs.efficiency`), every stage's results, the config (``config.yaml``), and the failures with hints and log tails.

The HTML page is one self-contained file: pictures are ``data:`` URIs, the timeline is inline
SVG, the style is inline; nothing is fetched when it is opened. The markdown page links its
pictures relative to where it is written: charts drawn from ``metrics.csv`` go to
``<name>_files/`` beside it, a stage's own pictures are linked by their relative path.

Nothing here raises on a damaged run directory (a truncated ``metrics.csv``, an unreadable
marker, a stage that never ran): the page shows what is there.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import UserError
from .ledger import Run
from .runtime import read_marker, task_dir

# A final metric's name, best first: what the headline shows when a stage reports several numbers.
HEADLINE_NAMES = ("spearman", "uap", "map", "micro_ap", "correlation", "corr", "pearson", "accuracy", "acc",
                  "top1", "auc", "f1", "r2", "abs_error", "mae", "rmse", "mse", "error", "loss", "score")
NOT_METRICS = {"step", "steps", "epoch", "epochs", "fold", "folds", "task", "tasks", "count", "points", "seed",
               "n", "size", "rows", "samples", "w", "b"}
LOWER_IS_BETTER = re.compile(r"(loss|error|err|mse|mae|rmse|l1|l2|perplexity|ppl|wer|cer|nll|distance)", re.I)
MAX_PANELS = 6  # per chart: 2 train metrics + 4 validation ones
STATE_COLOURS = {"COMPLETED": "#2f6fb0", "RUNNING": "#e0922f", "FAILED": "#c8413b", "TIMEOUT": "#c8413b",
                 "OUT_OF_MEMORY": "#c8413b", "NODE_FAIL": "#c8413b", "CANCELLED": "#8a8f98",
                 "PREEMPTED": "#c8413b"}
QUEUE_COLOUR = "#f2cf8d"


# -- small readers that never raise --------------------------------------------------------------
def _iso(text: Any) -> Optional[_dt.datetime]:
    if not text:
        return None
    try:
        out = _dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return out if out.tzinfo else out.astimezone()


def _epoch(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    when = _iso(value)
    return when.timestamp() if when else None


def _marker(stage_dir: Path, task: Optional[int]) -> Dict[str, Any]:
    try:
        marker = read_marker(stage_dir, task)
    except (ValueError, OSError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None


def _read_text(path: Path, limit: int = 200_000) -> Optional[str]:
    try:
        with open(path, "r", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _flat(value: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``."""
    if isinstance(value, dict):
        out: List[Tuple[str, Any]] = []
        for k, v in value.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix or "value", value)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{len(value)} values]"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _stamp(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return _dt.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


# -- metrics.csv ---------------------------------------------------------------------------------
def read_metrics_csv(path: Path) -> Optional[Dict[str, Any]]:
    """``metrics.csv`` -> ``{"rows": n, "series": {split: {metric: [[step, value], ...]}}}``; rows
    that do not parse (a line cut by a crash, a non-number) are skipped; None when nothing is usable."""
    text = _read_text(path, limit=20_000_000)
    if not text:
        return None
    lines = text.splitlines()
    if not text.endswith("\n") and len(lines) > 1:
        lines = lines[:-1]  # the last line was being written when the file was read (or cut)
    try:
        rows = list(csv.reader(lines))
    except csv.Error:
        return None
    if not rows or "step" not in rows[0]:
        return None
    header = rows[0]
    i_step, i_split = header.index("step"), (header.index("split") if "split" in header else None)
    columns = [c for c in header if c not in ("step", "epoch", "split")]
    series: Dict[str, Dict[str, List[List[float]]]] = {}
    used = 0
    for row in rows[1:]:
        if len(row) != len(header):
            continue
        step = _number(row[i_step])
        if step is None:
            continue
        split = row[i_split] if i_split is not None else "train"
        got = False
        for col in columns:
            value = _number(row[header.index(col)])
            if value is not None:
                series.setdefault(split or "train", {}).setdefault(col, []).append([int(step), value])
                got = True
        used += got
    if not used:
        return None
    return {"rows": used, "series": series}


def lower_is_better(metric: str) -> bool:
    return bool(LOWER_IS_BETTER.search(metric))


def _primary(series: Dict[str, Dict[str, List[List[float]]]], declared: Optional[Tuple[str, str]]
             ) -> Optional[Tuple[str, str, str]]:
    """``(split, metric, mode)`` of the curve whose best step is marked: the metric the stage's
    BestCheckpoint output ranks by, else the first validation metric that is not a loss, else a loss."""
    val = series.get("val") or {}
    if declared and declared[0] in val:
        return "val", declared[0], declared[1]
    for name in val:
        if not lower_is_better(name):
            return "val", name, "max"
    for split in ("val", "train"):
        if "loss" in (series.get(split) or {}):
            return split, "loss", "min"
        if series.get(split):
            name = next(iter(series[split]))
            return split, name, "min" if lower_is_better(name) else "max"
    for split, cols in series.items():
        for name in cols:
            return split, name, "min" if lower_is_better(name) else "max"
    return None


def _best(points: List[List[float]], mode: str) -> Optional[List[float]]:
    if not points:
        return None
    return (min if mode == "min" else max)(points, key=lambda p: p[1])


def _declared_best(rec) -> Optional[Tuple[str, str]]:
    for out in (rec.outputs or {}).values():
        if isinstance(out, dict) and "best_of" in out and out.get("metric"):
            return str(out["metric"]), str(out.get("mode") or "min")
    return None


# -- collect -------------------------------------------------------------------------------------
def _submitted(rec, task: Optional[int], started: Optional[float]) -> Optional[float]:
    """When the task's attempt that ran was submitted (run.json ``history``): the newest
    submission holding it that is not after its start (marker times have whole seconds)."""
    best = None
    for entry in rec.history or []:
        if not isinstance(entry, dict):
            continue
        when = _number(entry.get("submitted"))
        tasks = entry.get("tasks")
        if when is None or (task is not None and isinstance(tasks, list) and task not in tasks):
            continue
        if started is not None and when > started + 1.0:
            continue
        if best is None or when > best:
            best = when
    return best


def _timeline(run: Run, states: Dict[str, Any]) -> List[Dict[str, Any]]:
    bars = []
    for rec in run.in_order():
        stage_dir = run.stage_dir(rec.name)
        st = states.get(rec.name)
        task_states = {t.index: t.state for t in getattr(st, "task_list", [])}
        for task in rec.task_indices:
            marker = _marker(stage_dir, task)
            start, end = _epoch(marker.get("started")), _epoch(marker.get("ended"))
            if task is None and start is None:
                start = _number(rec.started)
            if task is None and end is None and start is not None:
                end = _number(rec.ended)
            submitted = _submitted(rec, task, start)
            queued_from = "submitted"
            if submitted is None:  # not a Slurm job: it waited from the stage's start (its turn here)
                submitted, queued_from = _number(rec.started), "stage start"
            if submitted is not None and start is not None and submitted > start:
                submitted = start
            state = task_states.get(task, st.state if st else rec.state) if task is not None else (
                st.state if st else rec.state)
            bars.append({
                "stage": rec.name, "task": task, "label": rec.name if task is None else f"{rec.name}[{task}]",
                "state": state, "queued_from": queued_from if submitted is not None else None,
                "submitted": _stamp(submitted), "started": _stamp(start), "ended": _stamp(end),
                "submitted_s": submitted, "started_s": start, "ended_s": end,
                "queue_s": round(start - submitted, 1) if start is not None and submitted is not None else None,
                "run_s": round(end - start, 1) if start is not None and end is not None else None,
            })
    return bars


def _headline(stages: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The workflow's final result: the last completed stage that reports numbers."""
    for s in reversed(stages):
        if s["state"] != "COMPLETED":
            continue
        for source, value in (("metrics.json", s["metrics"]), ("result", None if s["array"] else s["result"])):
            if not isinstance(value, dict):
                continue
            pairs = [(k, _number(v)) for k, v in _flat(value)]
            pairs = [(k, v) for k, v in pairs if v is not None]
            metrics = [(k, v) for k, v in pairs if k.split(".")[-1].lower() not in NOT_METRICS] or pairs
            if not metrics:
                continue
            primary = None
            for want in HEADLINE_NAMES:
                primary = next(((k, v) for k, v in metrics if k.split(".")[-1].lower() == want), None)
                if primary:
                    break
            primary = primary or metrics[0]
            return {"stage": s["name"], "source": source, "metric": primary[0], "value": primary[1],
                    "others": [[k, v] for k, v in pairs if k != primary[0]]}
    return None


def _outcome(stages: List[Dict[str, Any]]) -> str:
    """"" when every stage completed (or was skipped), else what did not: ``refine FAILED, 2 not run``."""
    bad = [f"{s['name']} {s['state']}" for s in stages if s["state"] not in ("COMPLETED", "SKIPPED", "PLANNED")]
    waiting = sum(s["state"] == "PLANNED" for s in stages)
    return ", ".join(bad + ([f"{waiting} not run"] if waiting else []))


def collect(run: Run, base: Optional[Path] = None, with_series: bool = False) -> Dict[str, Any]:
    """Everything the page shows, as data (also what ``report --json`` prints). Picture and
    TensorBoard paths are relative to ``base`` (the page's folder; default the run directory).
    ``with_series`` keeps each curve's points (for drawing; ``--json`` leaves them out)."""
    base = Path(base) if base else run.dir

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, base)).as_posix()

    from .status import stage_states

    try:
        states = stage_states(run)
    except Exception as exc:  # noqa: BLE001 - the page still shows the record
        states, state_error = {}, f"{type(exc).__name__}: {exc}"
    else:
        state_error = ""
    rec = run.record
    timeline = _timeline(run, states)
    stages, curves = [], []
    for srec in run.in_order():
        name = srec.name
        st = states.get(name)
        stage_dir = run.stage_dir(name)
        bars = [b for b in timeline if b["stage"] == name]
        starts = [b["started_s"] for b in bars if b["started_s"] is not None]
        ends = [b["ended_s"] for b in bars if b["ended_s"] is not None]
        start, end = (min(starts) if starts else None), (max(ends) if ends else None)
        metrics_json = _read_json(stage_dir / "metrics.json")
        images, declared = [], _declared_best(srec)
        for task in srec.task_indices:
            where = task_dir(stage_dir, task)
            label = name if task is None else f"{name}[{task}]"
            parsed = read_metrics_csv(where / "metrics.csv")
            if parsed:
                primary = _primary(parsed["series"], declared)
                best = None
                if primary:
                    point = _best(parsed["series"][primary[0]][primary[1]], primary[2])
                    best = {"split": primary[0], "metric": primary[1], "mode": primary[2],
                            "step": point[0], "value": point[1]} if point else None
                curve = {"stage": name, "task": task, "label": label, "source": (where / "metrics.csv").relative_to(run.dir).as_posix(),
                         "rows": parsed["rows"], "best": best,
                         "metrics": {split: sorted(cols) for split, cols in parsed["series"].items()}}
                if with_series:
                    curve["series"] = parsed["series"]
                curves.append(curve)
            try:
                pngs = sorted(where.glob("*.png"))
            except OSError:
                pngs = []
            for png in pngs:
                if png.name == "losses.png" and parsed:
                    continue  # the same numbers, drawn from metrics.csv above with the best step marked
                images.append({"label": label, "path": rel(png), "file": str(png)})
        tb = stage_dir / "tb"
        stages.append({
            "name": name, "state": st.state if st else srec.state, "job_ids": list(st.job_ids) if st else [],
            "node": st.node if st else "", "elapsed": st.elapsed if st else "",
            "exit_code": st.exit_code if st else "", "where": srec.where, "array": srec.array,
            "tasks": st.task_counts if st else "", "handoff": (st.handoff if st else "") or "",
            "started": _stamp(start), "ended": _stamp(end),
            "duration_s": round(end - start, 1) if start is not None and end is not None else None,
            "result": st.result if st else None, "metrics": metrics_json,
            "task_results": [[t.index, t.result] for t in st.task_list if t.result is not None] if st else [],
            "metric": st.metric if st else "",
            "images": [i["path"] for i in images], "image_files": images,
            "tensorboard": rel(tb) if tb.is_dir() else None, "tensorboard_dir": str(tb) if tb.is_dir() else None,
            "hint": st.hint if st else None, "log_tail": list(st.log_tail) if st else [],
            "error": st.error if st else "",
        })
    efficiency = _efficiency(run, states)
    firsts = [b["submitted_s"] or b["started_s"] for b in timeline if (b["submitted_s"] or b["started_s"]) is not None]
    lasts = [b["ended_s"] for b in timeline if b["ended_s"] is not None]
    first, last = (min(firsts) if firsts else None), (max(lasts) if lasts else None)
    git = rec.get("git") if isinstance(rec.get("git"), dict) else {}
    return {
        "run": run.id, "workflow": run.workflow, "cluster": rec.get("cluster"), "backend": rec.get("backend"),
        "preset": rec.get("preset"), "created": rec.get("created"), "command": " ".join(rec.get("command") or []),
        "git": git, "debug": bool(rec.get("debug")), "run_dir": str(run.dir),
        "wall_s": round(last - first, 1) if first is not None and last is not None and last >= first else None,
        "headline": _headline(stages), "outcome": _outcome(stages), "timeline": timeline, "curves": curves, "stages": stages,
        "config": _read_text(run.dir / "config.yaml"), "state_error": state_error, "efficiency": efficiency,
    }


def _efficiency(run: Run, states: Dict[str, Any]) -> Dict[str, Any]:
    """The efficiency table (hpc_jobs/efficiency.py): a row per stage that ran on Slurm, and the
    run's CPU-hours and GPU-hours."""
    from . import efficiency as effmod

    try:
        eff = effmod.for_run(run, states or None)
    except Exception as exc:  # noqa: BLE001 - the page still shows the rest
        return {"source": f"{type(exc).__name__}: {exc}", "rows": [], "cpu_hours": None, "gpu_hours": None}
    rows = [effmod.row(st) for st in eff.stages.values() if st.tasks]
    return {"source": eff.source, "rows": rows, "cpu_hours": round(eff.cpu_hours, 4),
            "gpu_hours": round(eff.gpu_hours, 4), "stages": {n: st.as_dict() for n, st in eff.stages.items()}}


def _efficiency_table(eff: Dict[str, Any]) -> Tuple[List[str], List[List[str]], str]:
    """Header, rows (with a total row) and a note, for both page formats."""
    from .efficiency import COLUMNS, fmt_hours

    header = [label for _, label in COLUMNS]
    rows = [[r[key] for key, _ in COLUMNS] for r in eff.get("rows", [])]
    if rows:
        total = ["total", "", "", "", "", "", "", "", fmt_hours(eff["cpu_hours"]), fmt_hours(eff["gpu_hours"]), ""]
        rows.append(total)
    note = ("From sacct (CPU-hours = CPUs allocated x elapsed, as sreport charges; GPU-hours = GPUs "
            "allocated x elapsed; every submission and requeue counted). Peak memory is the largest step's "
            "MaxRSS per node, sampled by Slurm; GPU figures come from the training engine's heartbeat, "
            "n/a where none was measured. Flags: under a quarter of the memory or time asked, or GPUs idle.")
    if eff.get("source") != "sacct":
        note = f"No efficiency figures: {eff.get('source')}."
    elif not rows:
        note = "No stage has ended on Slurm yet."
    return header, rows, note


# -- pictures ------------------------------------------------------------------------------------
def curve_png(curve: Dict[str, Any]) -> Optional[bytes]:
    """One chart of a ``metrics.csv``: a panel per metric (train ones first, then validation),
    each with its own y axis, step on x; the best step of the ranked metric marked on every panel."""
    series = curve.get("series") or {}
    panels: List[Tuple[str, str]] = []
    for split, limit in (("train", 2), ("val", 4)):
        cols = list(series.get(split) or {})
        cols.sort(key=lambda c: (c != "loss", c))
        panels += [(split, c) for c in cols[:limit]]
    for split in series:
        if split not in ("train", "val"):
            panels += [(split, c) for c in list(series[split])[:1]]
    panels = panels[:MAX_PANELS]
    if not panels:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.9 * ncols, 2.7 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    best = curve.get("best") or {}
    colours = {"train": "#1f77b4", "val": "#d0672f"}
    for i, (split, name) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        points = series[split][name]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, "-" if len(xs) > 40 else ".-", color=colours.get(split, "#555"), lw=1.4, ms=4)
        ax.set_title(f"{split} {name}", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(name, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
        ax.margins(y=0.15)  # room for the best step's label
        if best.get("step") is not None:
            ax.axvline(best["step"], color="#2a9d55", ls="--", lw=1)
            if split == best.get("split") and name == best.get("metric"):
                ax.plot([best["step"]], [best["value"]], marker="*", color="#2a9d55", ms=13, zorder=5)
                ax.annotate(f"best {best['value']:.4g} @{best['step']}", (best["step"], best["value"]),
                            textcoords="offset points", xytext=(6, 6), fontsize=8, color="#1d6b3a")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _nice_step(span: float, ticks: int = 8) -> float:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= ticks:
            return float(step)
    return 86400.0 * math.ceil(span / 86400 / ticks)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def timeline_svg(bars: List[Dict[str, Any]]) -> str:
    """The Gantt chart: one row per stage (per task of an array), queue wait then run time, on a
    time axis from the run's first submission."""
    e = html.escape
    label_w, width, row_h, top = 150, 1000, 22, 34
    times = [t for b in bars for t in (b["submitted_s"], b["started_s"], b["ended_s"]) if t is not None]
    height = top + row_h * max(1, len(bars)) + 10
    out = [f'<svg class="gantt" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="100%" role="img" aria-label="stage timeline">']
    if not times:
        out.append(f'<text x="10" y="{top}" font-size="13" fill="#555">no stage has started yet</text></svg>')
        return "".join(out)
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 1.0)
    plot_w = width - label_w - 20

    def x(t: float) -> float:
        return label_w + (t - t0) / span * plot_w

    step = _nice_step(span)
    out.append(f'<text x="{label_w - 24}" y="{top - 10}" font-size="11" fill="#666" text-anchor="end">'
               f'time from start</text>')
    tick = 0.0
    while tick <= span + 1e-6:
        xx = x(t0 + tick)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 6}" x2="{xx:.1f}" y2="{height - 8}" stroke="#e4e7eb"/>')
        out.append(f'<text x="{xx:.1f}" y="{top - 10}" font-size="11" fill="#666" text-anchor="middle">'
                   f'{_clock(tick)}</text>')
        tick += step
    for i, b in enumerate(bars):
        y = top + i * row_h
        if i % 2:
            out.append(f'<rect x="0" y="{y}" width="{width}" height="{row_h}" fill="#f7f8fa"/>')
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" font-size="12" text-anchor="end" fill="#222">'
                   f'{e(b["label"])}</text>')
        if b["started_s"] is None:
            out.append(f'<text x="{label_w + 4}" y="{y + 15}" font-size="11" fill="#888">'
                       f'{e(b["state"] or "")} (did not start)</text>')
            continue
        if b["submitted_s"] is not None and b["started_s"] > b["submitted_s"]:
            qx, qw = x(b["submitted_s"]), max(x(b["started_s"]) - x(b["submitted_s"]), 1.0)
            out.append(f'<rect class="queue" x="{qx:.1f}" y="{y + 4}" width="{qw:.1f}" height="{row_h - 8}" '
                       f'fill="{QUEUE_COLOUR}"><title>{e(b["label"])}: waited {_duration(b["queue_s"])} '
                       f'(from {e(b["queued_from"] or "")})</title></rect>')
        end = b["ended_s"] if b["ended_s"] is not None else t1
        colour = STATE_COLOURS.get(str(b["state"]).split()[0] if b["state"] else "", "#5b6470")
        rx, rw = x(b["started_s"]), max(x(end) - x(b["started_s"]), 4.0)
        out.append(f'<rect class="run" x="{rx:.1f}" y="{y + 3}" width="{rw:.1f}" height="{row_h - 6}" '
                   f'fill="{colour}" rx="2"><title>{e(b["label"])}: {e(str(b["state"]))}, ran '
                   f'{_duration(b["run_s"])}</title></rect>')
        text = _duration(b["run_s"]) if b["run_s"] is not None else str(b["state"])
        tx, anchor, ink = rx + rw + 4, "start", "#555"
        if tx > width - 60:  # no room on the right: inside a wide bar, else on its left
            tx, anchor, ink = (rx + rw - 4, "end", "#fff") if rw > 56 else (rx - 4, "end", "#555")
        out.append(f'<text x="{tx:.1f}" y="{y + 15}" font-size="10" fill="{ink}" text-anchor="{anchor}">{e(text)}</text>')
    out.append("</svg>")
    return "".join(out)


# -- markdown ------------------------------------------------------------------------------------
def _plain(label: str) -> str:
    """``fit[2]`` -> ``fit task 2`` (brackets would end a markdown picture's text)."""
    return re.sub(r"\[(\d+)\]", r" task \1", label)


def _md_cell(text: Any) -> str:
    return str(text if text not in (None, "") else "-").replace("|", "\\|").replace("\n", " ")


def _result_rows(s: Dict[str, Any]) -> List[Tuple[str, List[Tuple[str, Any]]]]:
    """``(label, pairs)``: a plain stage's result and ``metrics.json``; each task's result of an array."""
    if not s["task_results"]:
        pairs = _result_pairs(s)
        return [(s["name"], pairs)] if pairs else []
    rows = [(f"{s['name']}[{i}]", _flat(r) if isinstance(r, dict) else [("result", r)]) for i, r in s["task_results"]]
    if s["metrics"] is not None:
        rows.append((s["name"], _result_pairs(dict(s, result=None))))
    return rows


def _result_pairs(s: Dict[str, Any]) -> List[Tuple[str, Any]]:
    """A stage's result then the ``metrics.json`` entries it does not already hold."""
    pairs: List[Tuple[str, Any]] = []
    if isinstance(s["result"], dict):
        pairs += _flat(s["result"])
    elif s["result"] is not None:
        pairs.append(("result", s["result"]))
    if isinstance(s["metrics"], dict):
        known = {k: v for k, v in pairs}
        pairs += [(f"metrics.json: {k}", v) for k, v in _flat(s["metrics"]) if k not in known]
    elif s["metrics"] is not None:
        pairs.append(("metrics.json", s["metrics"]))
    return pairs


def _headline_text(h: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    if not h:
        return "no result yet", "no completed stage has reported a result (metrics.json or a marker result)"
    where = f"from stage {h['stage']} ({'metrics.json' if h['source'] == 'metrics.json' else 'its result'})"
    return f"{h['metric']} = {_fmt(h['value'])}", where


def _state_text(s: Dict[str, Any]) -> str:
    """``COMPLETED``; an array: ``COMPLETED (3 tasks)``, or ``FAILED (3 tasks: 2 COMPLETED, 1 FAILED)``."""
    counts = s["tasks"]
    if not counts:
        return s["state"]
    total, _, detail = counts.partition(": ")
    if detail and "," not in detail and detail.split(" ", 1)[-1] == s["state"]:
        return f"{s['state']} ({total})"
    return f"{s['state']} ({counts})"


def _stage_row(s: Dict[str, Any]) -> List[Any]:
    state = _state_text(s)
    return [s["name"], state, ",".join(s["job_ids"]) or s["where"], s["node"], s["elapsed"], s["exit_code"],
            (s["started"] or "")[11:19] or None, (s["ended"] or "")[11:19] or None, _duration(s["duration_s"]),
            s["handoff"] or None, s["metric"]]


STAGE_COLUMNS = ("stage", "state", "job", "node", "elapsed", "exit", "started", "ended", "duration", "handoff",
                 "last metric")


def to_markdown(data: Dict[str, Any], pictures: Optional[Dict[str, str]] = None) -> str:
    """``pictures``: curve label -> the chart's path relative to the page (written beside it)."""
    pictures = pictures or {}
    big, where = _headline_text(data["headline"])
    lines = [f"# Run {data['run']} ({data['workflow']})", "", f"**{big}** — {where}", ""]
    if data["outcome"]:
        lines += [f"**the run did not complete:** {data['outcome']}", ""]
    h = data["headline"]
    if h and h["others"]:
        lines += ["also: " + ", ".join(f"{k}={_fmt(v)}" for k, v in h["others"][:8]), ""]
    git = data["git"]
    lines += [
        f"- cluster: {data['cluster']} ({data['backend']})" + ("  — **debug run**" if data["debug"] else ""),
        f"- preset: {data['preset'] or 'none'}",
        f"- created: {data['created'] or '-'}",
        f"- command: `{data['command']}`",
        f"- code: {git.get('sha') or 'not a git checkout'}" + (" (with uncommitted changes: git.diff)" if git.get("dirty") else ""),
        f"- wall time (first submission to last end): {_duration(data['wall_s'])}",
        f"- run directory: `{data['run_dir']}`",
        "",
        "## Timeline",
        "",
    ]
    if pictures.get("__timeline__"):
        lines += [f"![timeline]({pictures['__timeline__']})", ""]
    lines += ["| stage/task | state | queued from | queue wait | run time |", "|---|---|---|---|---|"]
    for b in data["timeline"]:
        lines.append("| " + " | ".join(_md_cell(x) for x in (b["label"], b["state"], b["queued_from"],
                                                               _duration(b["queue_s"]), _duration(b["run_s"]))) + " |")
    lines += ["", "## Curves", ""]
    shown = False
    for s in data["stages"]:
        curves = [c for c in data["curves"] if c["stage"] == s["name"]]
        if not curves and not s["image_files"] and not s["tensorboard"]:
            continue
        shown = True
        lines += [f"### {s['name']}", ""]
        for c in curves:
            best = c["best"]
            note = f" — best {best['split']} {best['metric']}={_fmt(best['value'])} @ step {best['step']}" if best else ""
            if c["label"] in pictures:
                lines += [f"![curves of {_plain(c['label'])}]({pictures[c['label']]})", ""]
            lines += [f"{c['label']}: `{c['source']}`, {c['rows']} rows{note}", ""]
        for img in s["image_files"]:
            lines += [f"![{_plain(img['label'])}: {Path(img['path']).name}]({img['path']})", ""]
        if s["tensorboard"]:
            lines += [f"TensorBoard: `tensorboard --logdir {s['tensorboard']}` (from this page's folder)", ""]
    if not shown:
        lines += ["No stage wrote metrics.csv or a picture.", ""]
    lines += ["## Stages", "", "| " + " | ".join(STAGE_COLUMNS) + " |", "|" + "---|" * len(STAGE_COLUMNS)]
    for s in data["stages"]:
        lines.append("| " + " | ".join(_md_cell(x) for x in _stage_row(s)) + " |")
    header, rows, note = _efficiency_table(data["efficiency"])
    lines += ["", "## Efficiency", ""]
    if rows:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(x) for x in r) + " |" for r in rows]
        lines.append("")
    lines += [note]
    lines += ["", "## Final metrics", ""]
    any_metrics = False
    for s in data["stages"]:
        for label, pairs in _result_rows(s):
            any_metrics = True
            lines += [f"**{label}**", "", "| metric | value |", "|---|---|"]
            lines += [f"| {_md_cell(k)} | {_md_cell(_fmt(v))} |" for k, v in pairs]
            lines.append("")
    if not any_metrics:
        lines += ["No stage reported results yet.", ""]
    if data["config"]:
        lines += ["## Config", "", "```yaml", data["config"].rstrip(), "```", ""]
    failed = [s for s in data["stages"] if s["hint"] or s["log_tail"]]
    if failed or data["state_error"]:
        lines += ["## Failures", ""]
        if data["state_error"]:
            lines += [f"status could not be read: {data['state_error']}", ""]
        for s in failed:
            lines.append(f"**{s['name']}** ({s['state']}, exit {s['exit_code'] or '-'})")
            if s["hint"]:
                lines.append(f"- hint: {s['hint'].get('hint', '')}")
            if s["log_tail"]:
                lines += ["", "```", *s["log_tail"], "```"]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# -- html ----------------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:#1f2328;background:#fff;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:22px;margin:0 0 14px}h2{font-size:17px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid #e4e7eb}
h3{font-size:14px;margin:16px 0 6px}
.headline{background:#eef5ff;border:1px solid #b9d3f3;border-radius:8px;padding:16px 20px;margin-bottom:18px}
.headline .value{font-size:30px;font-weight:600;color:#174a86}
.headline .outcome{color:#b3261e;font-weight:600;margin-top:6px}.headline .where{color:#4a5563;margin-top:2px}.headline .others{color:#4a5563;font-size:13px;margin-top:6px}
dl.identity{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}
dl.identity dt{color:#5b6470}dl.identity dd{margin:0;word-break:break-all}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#f6f8fa;border:1px solid #e4e7eb;border-radius:6px;padding:10px 12px;overflow:auto;max-height:420px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e4e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
.state-COMPLETED{color:#1d6b3a}.state-FAILED,.state-TIMEOUT,.state-OUT_OF_MEMORY,.state-NODE_FAIL{color:#b3261e;font-weight:600}
.dirty{color:#b3261e}.muted{color:#6b7280}
figure{margin:10px 0 18px}figure img{max-width:100%;border:1px solid #e4e7eb;border-radius:4px}
figcaption{color:#4a5563;font-size:12.5px}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin:0 4px 0 12px;border-radius:2px}
.failure pre{white-space:pre-wrap;word-break:break-all}.failure{border-left:4px solid #c8413b;padding:4px 12px;margin:10px 0}
"""


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _legend(bars: List[Dict[str, Any]]) -> str:
    """The colours the timeline uses: queue wait, and one per state its bars are in."""
    items = [(QUEUE_COLOUR, "queue wait (from submission; here: from the stage's start)")]
    seen = []
    for b in bars:
        word = str(b["state"] or "").split(" ")[0]
        if b["started_s"] is not None and word not in seen:
            seen.append(word)
            items.append((STATE_COLOURS.get(word, "#5b6470"), f"run ({word.lower()})"))
    if not any(b["queued_from"] == "stage start" for b in bars):
        items[0] = (QUEUE_COLOUR, "queue wait (from submission)")
    elif all(b["queued_from"] == "stage start" for b in bars if b["queued_from"]):
        items[0] = (QUEUE_COLOUR, "wait (from the stage's start: not a Slurm run)")
    return "".join(f"<span style='background:{c}'></span>{html.escape(t)}" for c, t in items)


def to_html(data: Dict[str, Any]) -> str:
    e = html.escape
    h = data["headline"]
    big, where = _headline_text(h)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>run {e(data['run'])} ({e(data['workflow'])})</title><style>{STYLE}</style></head><body><main>",
             f"<h1>Run {e(data['run'])} <span class='muted'>({e(data['workflow'])})</span></h1>",
             f"<section class='headline' id='headline'><div class='value'>{e(big)}</div>"
             f"<div class='where'>{e(where)}</div>"]
    if data["outcome"]:
        parts.append(f"<div class='outcome'>the run did not complete: {e(data['outcome'])}</div>")
    if h and h["others"]:
        parts.append("<div class='others'>also: " + e(", ".join(f"{k}={_fmt(v)}" for k, v in h["others"][:8])) + "</div>")
    parts.append("</section>")
    git = data["git"]
    sha = git.get("sha") or "not a git checkout"
    code = f"<code>{e(sha)}</code>" + (" <span class='dirty'>(with uncommitted changes: git.diff)</span>"
                                       if git.get("dirty") else " (clean)" if git.get("sha") else "")
    identity = [("workflow", e(str(data["workflow"]))), ("run", f"<code>{e(str(data['run']))}</code>"),
                ("cluster", e(f"{data['cluster']} ({data['backend']})") + (" — <b>debug run</b>" if data["debug"] else "")),
                ("preset", e(str(data["preset"] or "none"))), ("git commit", code),
                ("command", f"<code>{e(data['command'])}</code>"), ("created", e(str(data["created"] or "-"))),
                ("wall time", e(_duration(data["wall_s"])) + " <span class='muted'>(first submission to last end)</span>"),
                ("run directory", f"<code>{e(data['run_dir'])}</code>")]
    parts.append("<section id='identity'><dl class='identity'>" +
                 "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in identity) + "</dl></section>")
    parts.append("<h2>Timeline</h2><section id='timeline'>" + timeline_svg(data["timeline"]) +
                 "<div class='legend muted'>" + _legend(data["timeline"]) + "</div></section>")
    parts.append("<h2>Curves</h2><section id='curves'>")
    shown = False
    for s in data["stages"]:
        curves = [c for c in data["curves"] if c["stage"] == s["name"]]
        if not curves and not s["image_files"] and not s["tensorboard_dir"]:
            continue
        shown = True
        parts.append(f"<h3>{e(s['name'])}</h3>")
        for c in curves:
            png = curve_png(c)
            best = c["best"]
            note = f"; best {best['split']} {best['metric']} = {_fmt(best['value'])} at step {best['step']}" if best else ""
            caption = f"{c['label']}: {c['source']} ({c['rows']} rows){note}"
            if png:
                parts.append(f"<figure><img src='{_data_uri(png)}' alt='{e(c['label'])} curves'>"
                             f"<figcaption>{e(caption)}</figcaption></figure>")
            else:
                parts.append(f"<p class='muted'>{e(caption)} (not drawn: matplotlib is not installed)</p>")
        for img in s["image_files"]:
            try:
                raw = Path(img["file"]).read_bytes()
            except OSError:
                parts.append(f"<p class='muted'>{e(img['path'])}: unreadable</p>")
                continue
            parts.append(f"<figure><img src='{_data_uri(raw)}' alt='{e(img['label'])}: {e(Path(img['path']).name)}'>"
                         f"<figcaption>{e(img['label'])}: {e(Path(img['path']).name)} (written by the stage)"
                         f"</figcaption></figure>")
        if s["tensorboard_dir"]:
            parts.append(f"<p>TensorBoard: <code>tensorboard --logdir {e(s['tensorboard_dir'])}</code></p>")
    if not shown:
        parts.append("<p class='muted'>No stage wrote metrics.csv or a picture.</p>")
    parts.append("</section>")
    head = "".join(f"<th>{c}</th>" for c in STAGE_COLUMNS)
    rows = []
    for s in data["stages"]:
        cells = _stage_row(s)
        cls = f"state-{e(s['state'].split()[0])}" if s["state"] else ""
        rows.append(f"<tr class='stage'><td><b>{e(s['name'])}</b></td><td class='{cls}'>{e(str(cells[1]))}</td>" +
                    "".join(f"<td>{e(str(x if x not in (None, '') else '-'))}</td>" for x in cells[2:]) + "</tr>")
    parts.append(f"<h2>Stages</h2><section id='stages'><table><thead><tr>{head}</tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table></section>")
    header, erows, note = _efficiency_table(data["efficiency"])
    table = ""
    if erows:
        table = ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>" +
                 "".join("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in erows) +
                 "</tbody></table>")
    parts.append(f"<h2>Efficiency</h2><section id='efficiency'>{table}<p class='muted'>{e(note)}</p></section>")
    results = []
    for s in data["stages"]:
        for label, pairs in _result_rows(s):
            own = [f"{k}={_fmt(v)}" for k, v in pairs if not k.startswith("metrics.json")]
            files = [f"{k[len('metrics.json: '):]}={_fmt(v)}" if k.startswith("metrics.json: ") else _fmt(v)
                     for k, v in pairs if k.startswith("metrics.json")]
            text = "; ".join(x for x in (", ".join(own), ("metrics.json: " + ", ".join(files)) if files else "") if x)
            results.append(f"<tr><td><b>{e(label)}</b></td><td>{e(text)}</td></tr>")
    parts.append("<h2>Results</h2><section id='results'>" +
                 (f"<table><thead><tr><th>stage</th><th>result</th></tr></thead><tbody>{''.join(results)}</tbody></table>"
                  if results else "<p class='muted'>No stage reported results yet.</p>") + "</section>")
    if data["config"]:
        parts.append(f"<h2>Config</h2><section id='config'><pre>{e(data['config'].rstrip())}</pre></section>")
    failed = [s for s in data["stages"] if s["hint"] or s["log_tail"]]
    if failed or data["state_error"]:
        parts.append("<h2>Failures</h2><section id='failures'>")
        if data["state_error"]:
            parts.append(f"<p>status could not be read: {e(data['state_error'])}</p>")
        for s in failed:
            parts.append(f"<div class='failure'><b>{e(s['name'])}</b> ({e(s['state'])}, exit {e(str(s['exit_code'] or '-'))})")
            if s["hint"]:
                parts.append(f"<p>hint: {e(str(s['hint'].get('hint', '')))}</p>")
            if s["log_tail"]:
                parts.append("<pre>" + e("\n".join(s["log_tail"])) + "</pre>")
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


# -- writing -------------------------------------------------------------------------------------
def report_path(run: Run, fmt: str, output: Optional[Path]) -> Path:
    """Where the page goes: ``RUN_DIR/report.<fmt>``, or ``-o PATH`` (a folder gets report.<fmt>
    inside). A missing folder is created only when its parent exists."""
    name = "report.html" if fmt == "html" else "report.md"
    if not output:
        return run.dir / name
    path = Path(output).expanduser().absolute()
    if path.is_dir():
        return path / name
    parent = path.parent
    if not parent.is_dir():
        if parent.exists():
            raise UserError(f"report -o {output}: {parent} is not a directory; give a path in a folder")
        if not parent.parent.is_dir():
            raise UserError(f"report -o {output}: folder {parent} does not exist and neither does its parent "
                            f"{parent.parent}; create it first (report creates one missing folder only)")
        parent.mkdir()
    return path


def write_report(run: Run, fmt: str = "md", output: Optional[Path] = None) -> Path:
    from .fsutil import atomic_write_bytes, atomic_write_text

    path = report_path(run, fmt, output)
    data = collect(run, base=path.parent, with_series=True)
    if fmt == "html":
        text = to_html(data)
    else:  # the charts go beside the page, so the page's links hold wherever it is written
        folder = path.parent / f"{path.stem}_files"
        pictures: Dict[str, str] = {}
        drawn = [(c["label"], curve_png(c)) for c in data["curves"]]
        if data["timeline"] or any(png for _, png in drawn):
            folder.mkdir(exist_ok=True)
        if data["timeline"]:
            atomic_write_text(folder / "timeline.svg", timeline_svg(data["timeline"]) + "\n", fsync=False)
            pictures["__timeline__"] = f"{folder.name}/timeline.svg"
        for label, png in drawn:
            if png:
                file = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") + ".png"
                atomic_write_bytes(folder / file, png, fsync=False)
                pictures[label] = f"{folder.name}/{file}"
        text = to_markdown(data, pictures)
    atomic_write_text(path, text, mode=0o600, fsync=False)
    return path
