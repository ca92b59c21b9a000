"""What the benchmark modules share: repetitions, their summary (median, min, max) and the table.

Every table compares each row with its baseline row, measured in the same run on the same machine.
Nothing here asserts a time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

Summary = Dict[str, float]


def summary(samples: List[float]) -> Summary:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def timed(fn: Callable[[], None], reps: int) -> List[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def table(title: str, results: Dict[str, Summary], baseline: Optional[str] = None, unit: str = "s",
          digits: int = 3, ratio: str = "ratio to baseline", notes: Optional[List[str]] = None) -> str:
    """A markdown table: median, min, max and the repetitions of each row, and its median over the
    baseline's (the first row unless named)."""
    base = results[baseline or next(iter(results))]["median"]
    lines = [f"### {title}", "", f"| what | median {unit} | min | max | n | {ratio} |", "|---|---|---|---|---|---|"]
    for name, s in results.items():
        r = f"{s['median'] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {s['median']:.{digits}f} | {s['min']:.{digits}f} | {s['max']:.{digits}f} "
                     f"| {s['n']} | {r} |")
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def have_slurm() -> bool:
    """sbatch on PATH and a controller that answers (the sections that submit need both)."""
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run(*argv: str, timeout: float = 60, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env if env is None else {**os.environ, **env})


def scancel(ids: List[str]) -> None:
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def slurm_main(prog: str, doc: str, report: Callable[[int, Path], str], reps: int, argv=None) -> int:
    """``python -m benchmarks.X [--reps N]`` for a section that submits to Slurm: print its table."""
    import argparse
    import sys
    import tempfile

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=reps)
    args = p.parse_args(argv)
    if not have_slurm():
        print("no Slurm on this machine (sbatch/sinfo): nothing to measure", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix=f"hpcjobs-{prog.rsplit('.', 1)[-1]}-", dir="/tmp"))
    try:
        print(report(args.reps, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def wait_for_room(needed: int, timeout: float = 360.0) -> None:
    """Wait until the controller can take ``needed`` more job records: every array task a benchmark
    cancels stays a record for MinJobAge (300 s on the dev cluster), and at MaxJobCount sbatch is
    refused ("Resource temporarily unavailable"). Returns at the timeout regardless."""
    import re

    conf = run("scontrol", "show", "config").stdout
    found = re.search(r"MaxJobCount\s*=\s*(\d+)", conf)
    limit = int(found.group(1)) if found else 10000
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job_records(run("scontrol", "show", "jobs", "-o").stdout) + needed + 200 <= limit:
            return
        time.sleep(5)


def job_records(text: str) -> int:
    """What counts against MaxJobCount in ``scontrol show jobs -o``: one per job, one per task of
    an array (``ArrayTaskId=0-499%10`` is 500)."""
    import re

    total = 0
    for line in text.splitlines():
        if not line.startswith("JobId="):
            continue
        found = re.search(r"ArrayTaskId=(\S+)", line)
        if not found:
            total += 1
            continue
        for part in found.group(1).split("%")[0].split(","):
            lo, _, hi = part.partition("-")
            try:
                total += int(hi) - int(lo) + 1 if hi else 1
            except ValueError:
                total += 1
    return total

