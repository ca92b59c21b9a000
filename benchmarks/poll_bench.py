"""Polling: scheduler calls per hour with 1, 50 and 500 jobs, hpc-jobs' ``status`` against plain
submitit's watcher (the measurement behind docs/monitoring.md).

It submits held job arrays (1, 50, 500 tasks) as hpc-jobs runs, then counts the ``sacct``/``squeue``
calls (a counting shim on PATH) that submitit's own watcher (``SlurmInfoWatcher``, what
``job.done()``/``job.state``/``job.result()`` use) and ``python launch.py status RUN`` (its
``hpc_jobs.status.stage_states``: the shared poller plus the jobs' own marker files) make while
they watch the SAME jobs, for three ways of watching:

- A: one long-lived watcher polling every second;
- B: a fresh process every 10 s (``watch -n 10``, cron, a notebook cell);
- C: three terminals watching at once, every second.

Time is simulated (a fake clock drives both tools' timers over one hour); every counted call is a
real call to the cluster (or, with ``--replay``, its first real answer again). ``--real-seconds S``
also measures pattern A in real time for S seconds, scaled to an hour. The jobs are held and
cancelled at the end: none runs.

    python -m benchmarks.poll_bench [--real-seconds S] [--no-simulation] [--patterns ABC]

(``python -m tests.integration.test_monitoring_cluster measure`` runs the same.) The helpers
``make_shim``, ``count_calls`` and ``submit_held_array`` are also used by
``tests/integration/test_monitoring_cluster.py``. Nothing asserts a count here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run  # noqa: E402

SIZES = (1, 50, 500)
PATTERNS = {
    "A": "A: one long-lived watcher, polling every 1 s",
    "B": "B: a new process every 10 s (`watch -n 10`, cron, notebook)",
    "C": "C: three terminals watching, every 1 s",
}


# -- a counting shim for sacct/squeue ------------------------------------------------------------
def make_shim(folder: Path, replay: bool = False) -> Path:
    """``sacct``/``squeue`` wrappers that log ``$HJ_CALLER tool`` to ``$HJ_COUNT``, then run the real one.

    ``replay``: a call with the same arguments as an earlier one gets that call's answer again
    (output and exit code) instead of asking the cluster; every call is still counted. Only for
    jobs whose answer cannot change (held ones): it makes the simulated hour fast."""
    folder.mkdir(parents=True, exist_ok=True)
    answers = folder / "answers"
    if replay:
        answers.mkdir(exist_ok=True)
    search = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != folder)
    for tool in ("sacct", "squeue"):
        real = shutil.which(tool, path=search)  # not this shim, when it is already on PATH
        if not real:
            raise RuntimeError(f"no {tool} on PATH")
        path = folder / tool
        text = f'#!/bin/sh\necho "${{HJ_CALLER:-?}} {tool}" >> "$HJ_COUNT"\n'
        if replay:
            text += (f'key="{answers}/{tool}-$(printf \'%s\\n\' "$@" | cksum | tr \' \' -)"\n'
                     'if [ ! -f "$key.rc" ]; then\n'
                     f'  {real} "$@" > "$key.out"; echo $? > "$key.rc"\n'
                     'fi\n'
                     'cat "$key.out"; exit "$(cat "$key.rc")"\n')
        else:
            text += f'exec {real} "$@"\n'
        path.write_text(text)
        path.chmod(0o755)
    return folder


def count_calls(count_file: Path) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    try:
        lines = count_file.read_text().splitlines()
    except FileNotFoundError:
        return counts
    for line in lines:
        caller = line.split()[0]
        counts[caller] = counts.get(caller, 0) + 1
    return counts


def submit_held_array(n: int, name: str) -> str:
    """A held array of ``n`` no-op tasks (``--output=/dev/null``); returns the array's job id."""
    proc = run("sbatch", "--parsable", "--hold", f"--array=0-{n - 1}" if n > 1 else "--array=0", f"--job-name={name}",
               "--partition=batch", "--output=/dev/null", "--wrap=true")
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


# -- the measurement -------------------------------------------------------------------------------
class FakeTime:
    """A clock for submitit's watcher and our poller: an hour passes in seconds."""

    def __init__(self) -> None:
        self.t = time.time()

    def time(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _wait_for_accounting(array_ids: List[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {line.split("_")[0].split("|")[0]
                for line in run("sacct", "-X", "-n", "-P", "-o", "JobID", "-j", ",".join(array_ids)).stdout.split()}
        if set(array_ids) <= seen:
            return
        time.sleep(0.5)
    raise RuntimeError(f"sacct does not list the held arrays {array_ids} after {timeout:.0f} s")


def _launch_held(n: int, home: Path):
    """A held hpc-jobs run: one stage, an array of ``n`` no-op tasks (the benchmarks' bench_array)."""
    from benchmarks.submit_bench import held
    from hpc_jobs.launch import LaunchRequest, launch

    os.environ["HPC_JOBS_HOME"] = str(home)
    with held(home / "held-sbatch"):
        result = launch(LaunchRequest(workflow="bench_array", cluster="devcluster", overrides={"tasks": n},
                                      run_name=f"watch-{n}"), echo=lambda s: None)
    return result.run


class _Watcher:
    """What ``python launch.py status RUN`` does on every read (``status.stage_states``), with the
    poller's timers on ``clock``; ``fresh_process``: a new poller and run object per read."""

    def __init__(self, run, home: Path, settings, clock: FakeTime) -> None:
        self.run, self.home, self.settings, self.clock = run, home, settings, clock

    def read(self, fresh_process: bool = False) -> None:
        from hpc_jobs import poller, status
        from hpc_jobs.ledger import Run

        os.environ["HPC_JOBS_HOME"] = str(self.home)  # this watcher's own cache
        path = poller.default_cache_path()
        if fresh_process or poller._DEFAULT is None or poller._DEFAULT.path != path:
            poller._DEFAULT = poller.Poller(path, self.settings, clock=self.clock.time)
        run = Run(self.run.dir) if fresh_process else self.run
        status.stage_states(run, triage=False, now=self.clock.time())


def measure(real_seconds: float = 0.0, simulate: bool = True, patterns: str = "ABC",
            sizes: Sequence[int] = SIZES, work: Optional[Path] = None,
            replay: bool = False, given: Optional[Dict[int, object]] = None) -> Dict[str, Dict[int, float]]:
    """``{"submitit A": {1: calls, 50: calls, 500: calls}, "hpc-jobs A": {...}, ...}``: scheduler
    calls per hour. The same held arrays (submitted by hpc-jobs) are watched by submitit's own
    watcher and by ``status`` (``hpc_jobs.status.stage_states``: the poller with its shipped
    settings, ``PollerConfig()`` / ``HPC_JOBS_POLL_*``, plus the jobs' own files). ``replay``:
    during the simulated hour, a query repeated with the same arguments gets its first (real)
    answer again (the held jobs cannot change): the same counts, minutes faster; the real-time
    window always asks the cluster. ``given``: held runs (size -> Run) to watch instead of
    launching them here (the caller cancels those)."""
    import submitit.core.core as sub_core
    from submitit.slurm.slurm import SlurmInfoWatcher

    from hpc_jobs import poller as pollermod
    from hpc_jobs.poller import PollerConfig

    work = (Path(work) if work else Path(tempfile.gettempdir())) / f"hpcjobs-measure-{uuid.uuid4().hex[:6]}"
    shim = make_shim(work / "shim", replay=replay)
    count = work / "calls.log"
    saved_env = {k: os.environ.get(k) for k in ("PATH", "HJ_COUNT", "HJ_CALLER", "HPC_JOBS_HOME")}
    saved_default = pollermod._DEFAULT
    settings = PollerConfig.from_env()
    runs: Dict[int, object] = {}
    ids: Dict[int, List[str]] = {}
    results: Dict[str, Dict[int, float]] = {}
    real_time = sub_core._time
    try:
        from benchmarks.common import wait_for_room

        wait_for_room(sum(n for n in sizes if n not in (given or {})))
        for n in sizes:
            runs[n] = (given or {}).get(n) or _launch_held(n, work / f"launch-{n}")
            ids[n] = [f"{runs[n].stage('tasks').job_ids()[0]}_{i}" for i in range(n)]
        # let sacct see them: the lag right after submission (a refresh then costs sacct + squeue)
        # is not what we measure
        _wait_for_accounting([ids[n][0].split("_")[0] for n in sizes])
        os.environ["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
        os.environ["HJ_COUNT"] = str(count)
        for n in sizes if simulate else ():
            for pattern in patterns:
                clock = FakeTime()
                sub_core._time = clock  # submitit's watcher reads time through this module attribute
                k = 3 if pattern == "C" else 1
                watchers = [SlurmInfoWatcher(delay_s=600) for _ in range(k)]
                ours = [_Watcher(runs[n], work / f"home-{n}-{pattern}", settings, clock) for _ in range(k)]
                pollermod._DEFAULT = None
                for w in watchers:
                    for jid in ids[n]:
                        w.register_job(jid)
                step = 10.0 if pattern == "B" else 1.0
                end = clock.t + 3600
                while clock.t < end:
                    for w, mine in zip(watchers, ours):
                        if pattern == "B":  # a fresh process: a fresh watcher, as after `import submitit`
                            w = SlurmInfoWatcher(delay_s=600)
                            for jid in ids[n]:
                                w.register_job(jid)
                        os.environ["HJ_CALLER"] = f"submitit-{pattern}-{n}"
                        for jid in ids[n]:  # `all(j.done() for j in jobs)` (done() asks the shared watcher)
                            w.is_done(jid, mode="standard")
                        os.environ["HJ_CALLER"] = f"hpcjobs-{pattern}-{n}"
                        mine.read(fresh_process=pattern == "B")
                    clock.sleep(step)
                counts = count_calls(count)
                results.setdefault(f"submitit {pattern}", {})[n] = counts.get(f"submitit-{pattern}-{n}", 0)
                results.setdefault(f"hpc-jobs {pattern}", {})[n] = counts.get(f"hpcjobs-{pattern}-{n}", 0)
        sub_core._time = real_time
        if real_seconds:  # the long-lived pattern in real time, all sizes side by side
            make_shim(work / "shim")  # every call to the cluster
            watchers = {n: SlurmInfoWatcher(delay_s=600) for n in sizes}
            for n in sizes:  # as constructing or unpickling submitit Job objects does
                for jid in ids[n]:
                    watchers[n].register_job(jid)
            ours = {n: _Watcher(runs[n], work / f"home-real-{n}", settings, FakeTime()) for n in sizes}
            for mine in ours.values():
                mine.clock.time = time.time  # real time
            end = time.time() + real_seconds
            while time.time() < end:
                for n in sizes:
                    os.environ["HJ_CALLER"] = f"submitit-real-{n}"
                    for jid in ids[n]:
                        watchers[n].is_done(jid, mode="standard")
                    os.environ["HJ_CALLER"] = f"hpcjobs-real-{n}"
                    pollermod._DEFAULT = None
                    ours[n].read()
                time.sleep(1)
            counts = count_calls(count)
            scale = 3600.0 / real_seconds
            for n in sizes:
                results.setdefault("submitit real", {})[n] = round(counts.get(f"submitit-real-{n}", 0) * scale, 1)
                results.setdefault("hpc-jobs real", {})[n] = round(counts.get(f"hpcjobs-real-{n}", 0) * scale, 1)
    finally:
        sub_core._time = real_time
        pollermod._DEFAULT = saved_default
        for n in runs:
            if n in ids and n not in (given or {}):
                run("scancel", ids[n][0].split("_")[0])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(work, ignore_errors=True)
    return results


# -- the report ------------------------------------------------------------------------------------
def table(results: Dict[str, Dict[int, float]], real_seconds: float = 0.0, replay: bool = False) -> str:
    sizes = sorted({n for row in results.values() for n in row})
    head = " / ".join(str(n) for n in sizes)
    lines = [f"### polling: scheduler calls per hour (sacct + squeue), the same held arrays of {head} jobs", "",
             f"| watching pattern | plain submitit (baseline), {head} jobs | hpc-jobs `status`, {head} jobs "
             f"| ratio hpc-jobs / submitit |", "|---|---|---|---|"]
    keys = [k for k in PATTERNS if f"submitit {k}" in results]
    if "submitit real" in results:
        keys.append("real")
    for key in keys:
        sub, ours = results[f"submitit {key}"], results[f"hpc-jobs {key}"]
        label = PATTERNS.get(key) or f"A in real time, {real_seconds:.0f} s window x {3600 / real_seconds:.1f}"
        ratio = " / ".join(f"{ours[n] / sub[n]:.2f}x" if sub[n] else "-" for n in sizes)
        lines.append(f"| {label} | {' / '.join(f'{sub[n]:g}' for n in sizes)} | "
                     f"{' / '.join(f'{ours[n]:g}' for n in sizes)} | {ratio} |")
    note = ["Both tools watch the same held jobs side by side (submitted as hpc-jobs runs); a counting shim on "
            "PATH counts every call; hpc-jobs is what `status RUN` runs on each read (the shared poller with its "
            "shipped settings: 2 s minimum, 30 s maximum and 600 s quiet interval, plus the jobs' own files: "
            "pending jobs report their own start, so status asks the scheduler every 600 s, for changes from "
            "outside)."]
    if any(k in PATTERNS for k in keys):
        note.append("The patterns A-C run for an hour on a simulated clock (both tools' timers read it), so a "
                    "run gives the same counts every time (one repetition);")
        note.append("during it a query repeated with the same arguments got its first real answer again (the held "
                    "jobs cannot change), which leaves the counts as they are (quick run; a full run asks the "
                    "cluster every time)." if replay else "every counted call was a real call to the cluster.")
    if "real" in keys:
        note.append("The real-time row counts real calls in a real window, scaled to an hour (the start-up "
                    "ramp of both tools weighs more in a short window).")
    lines += ["", " ".join(note)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.poll_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="measure", choices=["measure"], help=argparse.SUPPRESS)
    p.add_argument("--real-seconds", type=float, default=0.0, help="also measure pattern A in real time")
    p.add_argument("--no-simulation", action="store_true", help="skip the simulated hour")
    p.add_argument("--patterns", default="ABC", help="which simulated patterns (default ABC)")
    p.add_argument("--replay", action="store_true",
                   help="simulated hour: answer a repeated query from its first real answer (fast, same counts)")
    p.add_argument("--json", action="store_true", help="also print the counts as JSON")
    args = p.parse_args(argv)
    res = measure(args.real_seconds, simulate=not args.no_simulation, patterns=args.patterns.upper(),
                  replay=args.replay)
    print(table(res, args.real_seconds, args.replay))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
