"""``python launch.py report RUN``: one page about a run (``report.md``, or ``report.html``).

What it holds: the run's identity (workflow, cluster, command, git commit), the stage table
(state, job ids, node, elapsed, exit code), the timings (start, end, duration of each stage from
its markers, and the wall time of the whole run), the curves (each training stage's
``losses.png``, linked relative to the run directory so the page can be copied with it), where the
TensorBoard events are, and the final metrics (each stage's result from its state marker and its
``metrics.json``). Failed stages keep their hint and the last lines of their error log.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .ledger import Run
from .runtime import read_marker


def _iso(text: Optional[str]) -> Optional[_dt.datetime]:
    if not text:
        return None
    try:
        return _dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None


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


def _timings(run: Run, name: str, entry: Dict[str, Any]) -> Tuple[Optional[_dt.datetime], Optional[_dt.datetime]]:
    stage_dir = run.stage_dir(name)
    tasks = range(entry["array"]) if entry.get("array") else [None]
    starts, ends = [], []
    for task in tasks:
        try:
            marker = read_marker(stage_dir, task) or {}
        except ValueError:
            marker = {}
        if _iso(marker.get("started")):
            starts.append(_iso(marker["started"]))
        if _iso(marker.get("ended")):
            ends.append(_iso(marker["ended"]))
    if not starts and entry.get("started"):
        starts.append(_dt.datetime.fromtimestamp(entry["started"]).astimezone())
    if not ends and entry.get("ended"):
        ends.append(_dt.datetime.fromtimestamp(entry["ended"]).astimezone())
    return (min(starts) if starts else None, max(ends) if ends else None)


def collect(run: Run, base: Optional[Path] = None) -> Dict[str, Any]:
    """Everything the page shows, as data (also what ``report --json`` prints). Picture and
    TensorBoard paths are relative to ``base`` (the page's folder; default the run directory)."""
    import os

    base = Path(base) if base else run.dir

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, base)).as_posix()

    from .status import stage_states

    states = stage_states(run)
    rec = run.record
    stages = []
    first, last = None, None
    for name, st in states.items():
        entry = rec["stages"][name]
        stage_dir = run.stage_dir(name)
        start, end = _timings(run, name, entry)
        if start and (first is None or start < first):
            first = start
        if end and (last is None or end > last):
            last = end
        metrics_json = None
        path = stage_dir / "metrics.json"
        if path.exists():
            try:
                metrics_json = json.loads(path.read_text())
            except ValueError:
                metrics_json = None
        images = sorted(rel(p) for p in stage_dir.glob("*.png"))
        tb = stage_dir / "tb"
        stages.append({
            "name": name, "state": st.state, "job_ids": st.job_ids, "node": st.node, "elapsed": st.elapsed,
            "exit_code": st.exit_code, "where": entry.get("where"), "array": entry.get("array"),
            "started": start.isoformat(timespec="seconds") if start else None,
            "ended": end.isoformat(timespec="seconds") if end else None,
            "duration_s": round((end - start).total_seconds(), 1) if start and end else None,
            "result": st.result, "metrics": metrics_json, "metric": st.metric, "images": images,
            "tensorboard": rel(tb) if tb.is_dir() else None,
            "hint": st.hint, "log_tail": st.log_tail, "error": st.error,
        })
    return {
        "run": run.id, "workflow": run.workflow, "cluster": rec.get("cluster"), "backend": rec.get("backend"),
        "created": rec.get("created"), "command": " ".join(rec.get("command") or []),
        "git": rec.get("git") or {}, "debug": bool(rec.get("debug")), "run_dir": str(run.dir),
        "wall_s": round((last - first).total_seconds(), 1) if first and last else None,
        "stages": stages,
    }


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _md_cell(text: Any) -> str:
    return str(text if text not in (None, "") else "-").replace("|", "\\|").replace("\n", " ")


def to_markdown(data: Dict[str, Any]) -> str:
    lines = [f"# Run {data['run']} ({data['workflow']})", ""]
    git = data["git"]
    lines += [
        f"- cluster: {data['cluster']} ({data['backend']})" + ("  — **debug run**" if data["debug"] else ""),
        f"- created: {data['created'] or '-'}",
        f"- command: `{data['command']}`",
        f"- code: {git.get('sha') or 'not a git checkout'}" + (" (with uncommitted changes: git.diff)" if git.get("dirty") else ""),
        f"- wall time (first start to last end): {_duration(data['wall_s'])}",
        f"- run directory: `{data['run_dir']}`",
        "",
        "## Stages",
        "",
        "| stage | state | job | node | elapsed | exit | started | ended | duration | last metric |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["stages"]:
        lines.append("| " + " | ".join(_md_cell(x) for x in (
            s["name"], s["state"], ",".join(s["job_ids"]) or s["where"], s["node"], s["elapsed"], s["exit_code"],
            (s["started"] or "")[11:19] or None, (s["ended"] or "")[11:19] or None, _duration(s["duration_s"]),
            s["metric"])) + " |")
    curves = [s for s in data["stages"] if s["images"]]
    lines += ["", "## Curves", ""]
    if not curves:
        lines += ["No stage wrote a plot (training stages leave `losses.png`).", ""]
    for s in curves:
        lines.append(f"### {s['name']}")
        lines.append("")
        for img in s["images"]:
            lines.append(f"![{s['name']}: {Path(img).name}]({img})")
            lines.append("")
        if s["tensorboard"]:
            lines.append(f"TensorBoard: `tensorboard --logdir {s['tensorboard']}` (from this page's folder)")
            lines.append("")
    lines += ["## Final metrics", ""]
    any_metrics = False
    for s in data["stages"]:
        pairs: List[Tuple[str, Any]] = []
        if isinstance(s["result"], dict):
            pairs += _flat(s["result"])
        elif s["result"] is not None:
            pairs.append(("result", s["result"]))
        if isinstance(s["metrics"], dict):
            known = {k for k, _ in pairs}
            pairs += [(f"metrics.json: {k}", v) for k, v in _flat(s["metrics"]) if k not in known]
        if not pairs:
            continue
        any_metrics = True
        lines += [f"**{s['name']}**", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | {_md_cell(_fmt(v))} |" for k, v in pairs]
        lines.append("")
    if not any_metrics:
        lines += ["No stage reported results yet.", ""]
    failed = [s for s in data["stages"] if s["hint"] or s["log_tail"]]
    if failed:
        lines += ["## Failures", ""]
        for s in failed:
            lines.append(f"**{s['name']}** ({s['state']}, exit {s['exit_code'] or '-'})")
            if s["hint"]:
                lines.append(f"- hint: {s['hint']['hint']}")
            if s["log_tail"]:
                lines += ["", "```", *s["log_tail"], "```"]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def to_html(data: Dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        "<tr>" + "".join(f"<td>{e(str(x if x not in (None, '') else '-'))}</td>" for x in (
            s["name"], s["state"], ",".join(s["job_ids"]) or s["where"], s["node"], s["elapsed"], s["exit_code"],
            _duration(s["duration_s"]), s["metric"])) + "</tr>" for s in data["stages"])
    images = "".join(f"<h3>{e(s['name'])}</h3>" + "".join(f'<img src="{e(img)}" alt="{e(img)}" style="max-width:100%">'
                                                          for img in s["images"])
                     for s in data["stages"] if s["images"]) or "<p>No stage wrote a plot.</p>"
    metrics = ""
    for s in data["stages"]:
        pairs = _flat(s["result"]) if isinstance(s["result"], dict) else []
        if isinstance(s["metrics"], dict):
            pairs += [(f"metrics.json: {k}", v) for k, v in _flat(s["metrics"])]
        if pairs:
            metrics += f"<h3>{e(s['name'])}</h3><table>" + "".join(
                f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in pairs) + "</table>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>run {e(data['run'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:3px 8px}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h1>Run {e(data['run'])} ({e(data['workflow'])})</h1>"
            f"<p>cluster {e(str(data['cluster']))}; command <code>{e(data['command'])}</code>; "
            f"wall time {_duration(data['wall_s'])}</p><h2>Stages</h2><table><tr><th>stage</th><th>state</th>"
            "<th>job</th><th>node</th><th>elapsed</th><th>exit</th><th>duration</th><th>last metric</th></tr>"
            f"{rows}</table><h2>Curves</h2>{images}<h2>Final metrics</h2>{metrics or '<p>none yet</p>'}"
            "</body></html>\n")


def write_report(run: Run, fmt: str = "md", output: Optional[Path] = None) -> Path:
    from .fsutil import atomic_write_text

    path = Path(output).resolve() if output else run.dir / ("report.html" if fmt == "html" else "report.md")
    data = collect(run, base=path.parent)
    text = to_html(data) if fmt == "html" else to_markdown(data)
    atomic_write_text(path, text, mode=0o600, fsync=False)
    return path
