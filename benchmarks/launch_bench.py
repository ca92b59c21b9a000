"""Launch-path benchmarks: dry-run wall time of every workflow, and submitting a 7-stage chain to
Slurm.

Each figure is measured against its baseline in the same run, several repetitions, median and
spread, with warm bytecode (:func:`warm_env`; one warm-up run each). The goal for a dry run is
0.5 s. Nothing here asserts a time. Run: ``python -m benchmarks.launch_bench [--reps N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
CHAIN = 7

if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.common import summary, table, timed  # noqa: E402,F401  (table: used by benchmarks/__main__.py)


def _python(*args: str, env=None) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, env=env,
                   stdin=subprocess.DEVNULL)


def warm_env(home: Path) -> Dict[str, str]:
    """The environment of a user's shell: bytecode compiled once and kept (an installed package has
    its .pyc; a checkout writes __pycache__ on its first run). Kept under ``home`` here, so the
    checkout gets no files, and written even where PYTHONDONTWRITEBYTECODE is set (CI sets it:
    then every run compiles every module, ~0.2 s of a launch)."""
    env = dict(os.environ, HPC_JOBS_HOME=str(home), PYTHONPYCACHEPREFIX=str(home / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def dry_run_args(workflow: str) -> List[str]:
    args = ["launch.py", workflow, "--cluster", "discovery", "--account", "bench", "--dry-run", "--json"]
    return args + ["--", "python", "train.py"] if workflow == "run" else args


def bench_dry_run(reps: int, home: Path) -> Dict[str, Dict[str, float]]:
    env = warm_env(home)
    workflows = _workflows()
    _python("-c", "import submitit", env=env)  # one warm-up run each: the bytecode cache
    for workflow in workflows:
        _python(*dry_run_args(workflow), env=env)
    results = {
        "python -c 'import submitit' (baseline)": summary(timed(lambda: _python("-c", "import submitit", env=env), reps)),
    }
    for workflow in workflows:
        results[f"launch.py {workflow} --dry-run"] = summary(timed(lambda w=workflow: _python(*dry_run_args(w), env=env),
                                                                   reps))
    return results


GOAL_DRY_RUN_S = 0.5


def dry_run_notes(results: Dict[str, Dict[str, float]]) -> List[str]:
    over = [name for name, s in results.items() if name.startswith("launch.py") and s["median"] >= GOAL_DRY_RUN_S]
    verdict = (f"reached by every workflow (slowest median {max(s['median'] for n, s in results.items() if n.startswith('launch.py')):.3f} s)"
               if not over else "NOT reached by " + ", ".join(over))
    return [f"Goal: every workflow's dry run under {GOAL_DRY_RUN_S} s: {verdict}. Each command is a new process "
            "with warm bytecode (as an installed package has; one warm-up run each), `--cluster discovery "
            "--dry-run --json`; the launch path imports no torch, numpy or submitit."]


def _workflows() -> List[str]:
    out = subprocess.run([sys.executable, "launch.py", "list"], cwd=REPO, capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


# -- the 7-stage chain on the dev cluster ----------------------------------------------------------
# (the jobs are cancelled right after submission: only submission is timed)
from hpc_jobs import Pipeline, Resources, Stage, Workflow, register  # noqa: E402


def _noop(ctx):
    return None


@dataclass
class ChainConfig:
    stages: int = CHAIN


@register
class Chain(Workflow):
    name = "bench_chain"
    summary = "benchmark: a chain of no-op stages"
    Config = ChainConfig

    def build(self):
        res = Resources(time="00:05:00", mem="100M")
        stages = [Stage(f"s{i}", _noop, resources=res, after=[f"s{i - 1}"] if i else []) for i in range(self.config.stages)]
        return Pipeline(self.name, stages)


def bench_submit_chain(reps: int, home: Path) -> Dict[str, Dict[str, float]]:
    import submitit

    from hpc_jobs.launch import LaunchRequest, launch

    ids: List[str] = []
    os.environ["HPC_JOBS_HOME"] = str(home)

    def hpc_jobs_chain():
        result = launch(LaunchRequest(workflow="bench_chain", cluster="devcluster"), echo=lambda s: None)
        ids.extend(result_ids(result))

    def result_ids(result):
        return [j.job_id for rec in result.run.in_order() for j in rec.jobs]

    def clean():  # an empty queue before each repetition: queue length changes sbatch latency
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
            ids.clear()

    def plain_submitit_chain():
        folder = home / "submitit"
        previous = None
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")  # one executor, as a user writes it
        for i in range(CHAIN):
            params = {"dependency": f"afterok:{previous}"} if previous else {}
            ex.update_parameters(timeout_min=5, slurm_partition="batch", slurm_additional_parameters=params)
            job = ex.submit(_noop, None)
            previous = job.job_id
            ids.append(job.job_id)

    def bare_sbatch_chain():
        previous = None
        for i in range(CHAIN):
            args = ["sbatch", "--parsable", "--partition=batch", "--time=5", "--output=/dev/null", "--wrap=true"]
            if previous:
                args.append(f"--dependency=afterok:{previous}")
            previous = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
            ids.append(previous)

    results: Dict[str, List[float]] = {
        f"bare sbatch x{CHAIN} (baseline)": [],
        f"plain submitit x{CHAIN}": [],
        f"hpc-jobs launch, {CHAIN}-stage chain (preflight + ledger + submit)": [],
    }
    fns = [bare_sbatch_chain, plain_submitit_chain, hpc_jobs_chain]
    for _ in range(reps):  # interleaved, so load on the machine hits every contender alike
        for name, fn in zip(results, fns):
            clean()
            results[name] += timed(fn, 1)
    clean()
    return {name: summary(samples) for name, samples in results.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-slurm", action="store_true", help="skip the dev-cluster submission benchmark")
    args = p.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="hpcjobs-bench-", dir="/tmp"))
    try:
        dry = bench_dry_run(args.reps, home)
        print(table("launch: dry-run wall time", dry, "python -c 'import submitit' (baseline)"))
        if not args.no_slurm and shutil.which("sbatch"):
            sub = bench_submit_chain(args.reps, home)
            print()
            print(table(f"submit: a {CHAIN}-stage dependency chain to the dev cluster", sub, f"bare sbatch x{CHAIN} (baseline)"))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
