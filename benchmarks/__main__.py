"""``python -m benchmarks [--quick]``: every benchmark, each against its baseline measured in the
same run, written to docs/benchmarks.md (a table of ratios, the machine, the date, the versions).

Sections: launch (dry run of every workflow; a 7-stage chain submitted), submit (a 200-task array:
hpc-jobs vs bare sbatch vs submitit's map_array), polling (scheduler calls per hour, 1/50/500 jobs,
hpc-jobs' status vs submitit's watcher), scale (a 1,000-task array: launch vs map_array, status
RUN and status RUN STAGE against the 1 s goal, scheduler calls for 1 vs 1,000 tasks), training (steps/s of the tiny presets through the engine vs a bare torch
loop), resume (requeue signal to the first step after the restart, hpc-jobs vs a submitit
Checkpointable), data (frame extraction, loader vs model), isc (faiss vs numpy kNN, the
post-process). The ones that submit need the dev cluster and say so when there is no Slurm.

Nothing here asserts a time: the numbers are for reading. ``--quick`` finishes in about 3-4 minutes
on a 2-core machine (under 5); a full run takes about 20.
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
import time
import traceback
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


def _gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return "none (the GPU section measures nothing)"


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


def sections(quick: bool, home: Path) -> List[Tuple[str, Callable[[], str], bool]]:
    """(title, function returning the section's markdown, whether it needs Slurm); scratch files in ``home``."""
    from benchmarks import data_bench, launch_bench

    reps = 3 if quick else 7

    def launch() -> str:
        from benchmarks.common import have_slurm

        dry = launch_bench.bench_dry_run(reps, home)
        out = launch_bench.table("launch: dry-run wall time", dry, "python -c 'import submitit' (baseline)",
                                 notes=launch_bench.dry_run_notes(dry))
        if have_slurm():
            chain = launch_bench.bench_submit_chain(reps, home)
            out += "\n\n" + launch_bench.table(f"submit: a {launch_bench.CHAIN}-stage dependency chain to the dev cluster",
                                               chain, f"bare sbatch x{launch_bench.CHAIN} (baseline)")
        else:
            out += "\n\n" + NO_SLURM.format(what="the submission of a dependency chain")
        return out

    def submit_array() -> str:
        from benchmarks import submit_bench

        return submit_bench.report(reps, home / "submit")

    def polling() -> str:
        from benchmarks import poll_bench

        real = 0.0 if quick else 300.0
        res = poll_bench.measure(real, patterns="AB" if quick else "ABC", work=home, replay=quick)
        return poll_bench.table(res, real, replay=quick)

    def training() -> str:
        from benchmarks import train_bench

        warmup, steps = (2, 10) if quick else (5, 30)
        return train_bench.tables(train_bench.bench_training(3 if quick else 5, warmup, steps, home / "train"),
                                  warmup)

    def resume() -> str:
        from benchmarks import resume_bench

        return resume_bench.report(2 if quick else 5, home / "resume")

    def data() -> str:
        from data.diving import synthetic

        root = home / "mtl"
        synthetic.generate(root, preset="sparse" if not quick else "ci")
        out = data_bench.table("data: frame extraction (synthetic set annotated like MTL-AQA)" if not quick
                               else "data: frame extraction (synthetic 'ci' set, 65% annotated)",
                               data_bench.bench_extraction(root, 3))
        out += "\n\n" + data_bench.table("data: loader vs model (tiny preset, 64 px, 8 frames, CPU)",
                                         data_bench.bench_loader_vs_model(root, 3))
        return out

    def isc() -> str:
        from benchmarks import isc_bench

        knn_sizes, post_sizes, isc_reps = isc_bench.sizes(quick)
        return isc_bench.table(isc_bench.bench_knn(knn_sizes, isc_reps), isc_bench.bench_postprocess(post_sizes, isc_reps))

    def scale() -> str:
        from benchmarks import scale_bench

        return scale_bench.report(reps, home / "scale")

    def gpu() -> str:
        from benchmarks import gpu_bench

        return gpu_bench.report(quick)

    return [
        ("launch and submit", launch, False),
        ("submit: a 200-task array", submit_array, True),
        ("polling", polling, True),
        ("scale: a 1,000-task array", scale, True),
        ("training", training, False),
        ("resume after a requeue signal", resume, True),
        ("data", data, False),
        ("isc: search and post-process", isc, False),
        ("GPU", gpu, False),
    ]


NO_SLURM = "Skipped: no Slurm on this machine (no `sbatch`, or `sinfo` does not answer): {what} needs the dev cluster."


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
        f"- GPU: {_gpu()}",
        "",
    ]
    from benchmarks.common import have_slurm

    slurm = have_slurm()
    started = time.monotonic()
    took: List[str] = []
    failed: List[str] = []
    home = Path(tempfile.mkdtemp(prefix="hpcjobs-bench-", dir="/tmp"))
    try:
        for title, fn, needs_slurm in sections(args.quick, home):
            print(f"[benchmarks] {title} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                body = fn() if slurm or not needs_slurm else NO_SLURM.format(what="this section")
            except Exception as exc:  # one broken section must not lose the others' figures
                failed.append(title)
                body = f"Failed: {type(exc).__name__}: {exc}"
                traceback.print_exc()
            took.append(f"{title}: {time.monotonic() - t0:.0f} s")
            print(f"[benchmarks] {took[-1]}", file=sys.stderr, flush=True)
            parts += [f"## {title}", "", body, ""]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    parts.append(f"Wall time of this run: {time.monotonic() - started:.0f} s ({'; '.join(took)}).")
    text = "\n".join(parts) + "\n"
    Path(args.output).write_text(text)
    print(text)
    if failed:
        print(f"[benchmarks] failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
