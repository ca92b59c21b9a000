"""``python -m benchmarks [--quick]``: every benchmark, each against its baseline measured in the
same run, written to docs/benchmarks.md (a table of ratios, the machine, the date, the versions).

Nothing here asserts a time: the numbers are for reading. ``--quick`` finishes in a few minutes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Tuple

REPO = Path(__file__).resolve().parents[1]


def _versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "submitit", "timm", "faiss-cpu", "deepspeed", "opencv-python-headless"):
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            continue
    slurm = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip() if shutil.which("sinfo") else "no Slurm"
    return ", ".join(parts + [slurm])


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}"


def sections(quick: bool) -> List[Tuple[str, Callable[[], str]]]:
    from benchmarks import data_bench, launch_bench

    reps = 3 if quick else 7
    home = Path(tempfile.mkdtemp(prefix="hpcjobs-bench-", dir="/tmp"))

    def launch() -> str:
        out = launch_bench.table("launch: dry-run wall time", launch_bench.bench_dry_run(reps, home),
                                 "python -c 'import submitit' (baseline)")
        if shutil.which("sbatch"):
            chain = launch_bench.bench_submit_chain(reps, home)
            out += "\n\n" + launch_bench.table(f"submit: a {launch_bench.CHAIN}-stage dependency chain to the dev cluster",
                                               chain, f"bare sbatch x{launch_bench.CHAIN} (baseline)")
        return out

    def data() -> str:
        from data.diving import synthetic

        root = home / "mtl"
        synthetic.generate(root, preset="sparse" if not quick else "ci")
        out = data_bench.table("data: frame extraction (synthetic set annotated like MTL-AQA)" if not quick
                               else "data: frame extraction (synthetic 'ci' set, 65% annotated)",
                               data_bench.bench_extraction(root, 1 if quick else 3))
        out += "\n\n" + data_bench.table("data: loader vs model (tiny preset, 64 px, 8 frames, CPU)",
                                         data_bench.bench_loader_vs_model(root, 1 if quick else 3))
        return out

    return [("launch and submit", launch), ("data", data)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller data (a few minutes)")
    p.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"), help="where to write the report")
    args = p.parse_args(argv)
    if not shutil.which("ffmpeg"):
        print("ffmpeg is missing (apt-get install ffmpeg): the extraction baseline needs it", file=sys.stderr)
        return 2
    parts = [
        "# Benchmarks",
        "",
        "Written by `python -m benchmarks" + (" --quick" if args.quick else "") + "`. Each row is the median of"
        " several repetitions (min and max beside it); the ratio compares the row with the first row of its"
        " table, measured in the same run on the same machine. Nothing in the test suite asserts a time.",
        "",
        f"- date: {_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {_machine()}",
        f"- versions: {_versions()}",
        "- GPU figures (TimeSformer bf16+SDPA vs fp32 explicit attention, faiss GPU vs CPU): not measured here"
        " (no GPU on this machine).",
        "",
    ]
    for title, fn in sections(args.quick):
        print(f"[benchmarks] {title} ...", file=sys.stderr, flush=True)
        parts += [f"## {title}", "", fn(), ""]
    text = "\n".join(parts)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
