"""What a run leaves for people and for the core: metrics.csv, TensorBoard events, losses.png,
heartbeat.json and progress lines. Only rank 0 creates these objects."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hpc_jobs.checkpoint import atomic_write_bytes

FIXED_COLUMNS = ("step", "epoch", "split")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 8)) if math.isfinite(value) else str(value)
    return str(value)


class MetricsCSV:
    """``metrics.csv``: one row per log line (step, epoch, split, metric columns). A row is
    appended with a single ``write`` on an O_APPEND descriptor; a new metric name rewrites the file
    atomically with the wider header. On resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = list(FIXED_COLUMNS)
        self.rows: list[dict[str, str]] = []
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or FIXED_COLUMNS)
                self.rows = [row for row in reader if row.get("step")]

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.rows if int(float(r["step"])) <= step]
        if len(kept) != len(self.rows) or not self.path.exists():
            self.rows = kept
            self._rewrite()

    def log(self, step: int, epoch: float, split: str, metrics: dict[str, float]) -> None:
        row = {"step": str(step), "epoch": _fmt(round(epoch, 4)), "split": split}
        row.update({k: _fmt(v) for k, v in metrics.items()})
        self.rows.append(row)
        new = [k for k in metrics if k not in self.columns]
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
            return
        line = self._encode([row], header=False)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _encode(self, rows: list[dict[str, str]], header: bool) -> bytes:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().encode()

    def _rewrite(self) -> None:
        atomic_write_bytes(self.path, self._encode(self.rows, header=True))

    def series(self, split: str, column: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            if r.get("split") == split and r.get(column) not in (None, ""):
                try:
                    xs.append(int(float(r["step"])))
                    ys.append(float(r[column]))
                except ValueError:
                    continue
        return xs, ys

    def metric_names(self, split: str) -> list[str]:
        names = []
        for c in self.columns[len(FIXED_COLUMNS):]:
            if any(r.get("split") == split and r.get(c) not in (None, "") for r in self.rows):
                names.append(c)
        return names


def plot_losses(metrics: MetricsCSV, path: Path, max_val_panels: int = 3) -> None:
    """``losses.png``: training loss, then up to ``max_val_panels`` validation metrics, by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_names = [n for n in metrics.metric_names("val") if n != "loss"][:max_val_panels]
    panels = 1 + len(val_names)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    xs, ys = metrics.series("train", "loss")
    ax.plot(xs, ys, label="train loss")
    vx, vy = metrics.series("val", "loss")
    if vx:
        ax.plot(vx, vy, "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend()
    for ax, name in zip(axes[0][1:], val_names):
        x, y = metrics.series("val", name)
        ax.plot(x, y, "o-")
        ax.set_xlabel("step")
        ax.set_title(f"val {name}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


class Heartbeat:
    """``heartbeat.json``, rewritten atomically at most every ``every_s`` seconds (and at each
    phase change) so the core and ``status`` can tell a live run from a stuck one."""

    def __init__(self, path: Path, every_s: float, total_steps: int, epochs: int) -> None:
        self.path, self.every_s = path, every_s
        self.total_steps, self.epochs = total_steps, epochs
        self.last_write = 0.0
        self.host, self.pid = socket.gethostname(), os.getpid()
        from hpc_jobs.efficiency import GpuSampler

        self.gpu = GpuSampler()  # GPU utilisation / memory at each write; "n/a" without a GPU

    def beat(self, *, step: int, epoch: float, loss: float | None, rate: float, samples_per_s: float,
             phase: str, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last_write < self.every_s:
            return
        self.last_write = now
        remaining = max(0, self.total_steps - step)
        payload = {
            "step": step, "epoch": round(epoch, 4), "total_steps": self.total_steps, "epochs": self.epochs,
            "loss": None if loss is None or not math.isfinite(loss) else loss,
            "rate": round(rate, 4), "samples_per_s": round(samples_per_s, 2),
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
            "time": now, "host": self.host, "pid": self.pid, "phase": phase,
        }
        self.gpu.sample()
        payload.update(self.gpu.fields())
        atomic_write_bytes(self.path, json.dumps(payload).encode())


class TensorBoard:
    """SummaryWriter in ``out_dir/tb``; ``purge_step`` drops events a resumed run will redo."""

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed: metrics.csv still has everything
            print(f"[engine] TensorBoard disabled ({exc})", file=sys.stderr, flush=True)
            return
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
