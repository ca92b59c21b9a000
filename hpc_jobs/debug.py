"""``python launch.py debug WORKFLOW --stage S``: run one stage by hand, in the foreground, in an
allocation with the batch job's resources, so a researcher can stop in a ``breakpoint()``.

How it stays faithful to the batch job:

* The workflow is planned exactly like a launch (``launch.make_plan`` -> ``preview_jobs`` ->
  ``preflight`` -> ``record_run``): same config resolution (``--preset``/``--config``/``--set``),
  same resources (``--gpus``/``--nodes``/``--partition``/``--time``...), same rendered script. The
  debug run gets its own run directory, marked ``"debug": true`` in run.json, with its own code
  snapshot; the other stages are SKIPPED.
* Inputs: a stage with inputs needs its upstream outputs. ``--from-run RUN`` points at an earlier
  run of the same workflow: each upstream stage directory of the debug run becomes a symlink to
  that run's (whose stages must have completed). A stage without inputs runs on its own.
* Slurm: ``salloc`` gets the stage's ``#SBATCH`` values (partition, account, QOS, constraint,
  nodes, tasks per node, CPUs per task, GRES, memory, time), then runs ``debug.sh``: the SAME
  template, rendered from the same JobScript, whose last line (``srun ... submitit``) is replaced by
  ``srun --pty ... python -m hpc_jobs.debug inner RUN_DIR STAGE`` (the stage runner, as in the batch
  job, with stdin on the terminal). So the profile's setup lines (module load, conda), the
  PYTHONPATH of the code snapshot and every ``HPC_JOBS_*``/profile variable are those of the batch
  job. ``--shell`` runs ``srun --pty bash -i`` in that environment instead (``$HPC_JOBS_DEBUG_CMD``
  holds the command that runs the stage). ``--break`` stops in pdb at the first line of the
  stage's entry function; ``--post-mortem`` opens pdb where an exception is raised.
* Local backend: the same runner in the foreground here (one rank), or the shell.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .errors import UserError, command

SALLOC_KEYS = ("job-name", "comment", "partition", "account", "qos", "constraint", "nodes", "ntasks-per-node",
               "cpus-per-task", "gres", "mem", "time")


@dataclass
class DebugRequest:
    stage: str
    from_run: Optional[str] = None
    shell: bool = False
    break_at_start: bool = False
    post_mortem: bool = False
    task: Optional[int] = None
    dry_run: bool = False


@dataclass
class DebugPlan:
    run: Any  # ledger.Run
    stage: str
    backend: str
    salloc: List[str]  # the salloc command (slurm)
    script_path: Optional[Path]  # debug.sh (slurm)
    inner: List[str]  # the command that runs the stage (inside the allocation / here)
    env: Dict[str, str]  # local backend: the environment of the foreground process


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _upstream_complete(src, parent: str) -> Optional[str]:
    """None when ``parent`` completed in run ``src``; else why not."""
    from .runtime import read_marker

    rec = src.stages.get(parent)
    if rec is None:
        return f"run {src.id} has no stage '{parent}'"
    stage_dir = src.stage_dir(parent)
    for task in rec.task_indices:
        marker = read_marker(stage_dir, task)
        if not marker or marker.get("state") != "COMPLETED":
            what = f"task {task} of " if task is not None else ""
            return f"{what}stage '{parent}' did not complete in run {src.id} ({(marker or {}).get('state', 'no marker')})"
    return None


def _newest_run_with(workflow: str, stages) -> Optional[Any]:
    """The newest recorded run of ``workflow`` in which every one of ``stages`` completed."""
    from .ledger import recent_runs

    for run in recent_runs(limit=200):
        if run.damaged or run.workflow != workflow or run.record.get("debug") or run.record.get("dry_run"):
            continue
        if all(name in run.stages and _upstream_complete(run, name) is None for name in stages):
            return run
    return None


def prepare(req, dreq: DebugRequest, echo: Callable[[str], None] = print) -> DebugPlan:
    """Plan, check and record the debug run; nothing runs yet."""
    from . import launch as launchmod
    from . import render as rendermod
    from .ledger import find_run

    if not req.run_name:
        req = dataclasses.replace(req, run_name=f"debug-{dreq.stage}-{_stamp()}-{os.urandom(2).hex()}")
    plan = launchmod.make_plan(req)  # applies --container too: the debug step runs in that image
    if dreq.stage not in plan.pipeline.stages:
        raise UserError(f"workflow '{plan.workflow.name}' has no stage '{dreq.stage}' "
                        f"(stages: {', '.join(plan.pipeline.order)})")
    stage = plan.pipeline[dreq.stage]
    if stage.array is not None:
        if dreq.task is None:
            dreq = dataclasses.replace(dreq, task=0)
        if not 0 <= dreq.task < stage.num_tasks:
            raise UserError(f"--task {dreq.task}: stage '{stage.name}' has tasks 0..{stage.num_tasks - 1}")
    elif dreq.task is not None:
        raise UserError(f"--task: stage '{stage.name}' is not an array")
    parents = stage.parents()
    src = None
    if parents:
        if not dreq.from_run:
            found = _newest_run_with(plan.workflow.name, parents)
            if found is None:
                raise UserError(
                    f"stage '{stage.name}' reads outputs of {', '.join(parents)}, and no earlier run of "
                    f"'{plan.workflow.name}' completed them: launch one first ({command()} {plan.workflow.name}), "
                    f"or give --from-run RUN")
            echo(f"debug: the inputs of stage {stage.name} come from run {found.id} (the newest where "
                 f"{', '.join(parents)} completed; --from-run RUN picks another)")
            dreq = dataclasses.replace(dreq, from_run=str(found.dir))
        src = find_run(dreq.from_run)
        if src.workflow != plan.workflow.name:
            raise UserError(f"--from-run {dreq.from_run} is a '{src.workflow}' run, not '{plan.workflow.name}'")
        for parent in parents:
            why = _upstream_complete(src, parent)
            if why:
                raise UserError(f"--from-run: {why}: resume that run first, or pick another")
    jobs = launchmod.preview_jobs(plan)
    backend = plan.profile.backend
    if backend == "slurm" and not dreq.dry_run:
        launchmod.preflight(plan, jobs, test_only=False)
    run = launchmod.record_run(plan, req, jobs)
    for name, rec in run.stages.items():
        if name == stage.name:
            rec.state, rec.debug = "PLANNED", True
        elif name in parents:
            rec.state, rec.reused_from, rec.reason = "COMPLETED", str(src.dir), f"reused from run {src.id}"
            link = run.stage_dir(name)
            shutil.rmtree(link, ignore_errors=True)
            link.symlink_to(src.stage_dir(name), target_is_directory=True)
        else:
            rec.state, rec.reason = "SKIPPED", f"debug run of stage {stage.name}"
    run.record.update(debug=True, debug_stage=stage.name, debug_task=dreq.task,
                      from_run=str(src.dir) if src else None, dry_run=bool(dreq.dry_run))
    if src is not None:
        diff = _config_diff(src, run)
        if diff:
            echo(f"note: the config differs from run {src.id}'s: {diff}")
    run.save()
    if not dreq.dry_run:
        run.remember()

    stage_dir = run.stage_dir(stage.name)
    python = plan.profile.python_command(plan.launch_python) if backend == "slurm" else sys.executable
    inner_args = ["-u", "-m", "hpc_jobs.debug", "inner", str(run.dir), stage.name]
    if dreq.task is not None:
        inner_args += ["--task", str(dreq.task)]
    if dreq.break_at_start:
        inner_args.append("--break")
    if dreq.post_mortem:
        inner_args.append("--post-mortem")
    if backend != "slurm" or stage.where != "batch":
        env = _local_env(run.dir, stage.name)
        inner = [sys.executable, *inner_args]
        env["HPC_JOBS_DEBUG_CMD"] = shlex.join(inner)
        return DebugPlan(run, stage.name, "local", [], None, inner, env)

    job = jobs[stage.name][0]
    pty = ["--pty"] if sys.stdin.isatty() else []
    container = None
    if job.container:  # the same image, binds and environment as the batch job's step
        from . import container as containermod

        container = containermod.Container(**job.container)
        python = (container.python or "python").replace("{launch_python}", shlex.quote(plan.launch_python))
    inner_cmd = f"{python} {shlex.join(inner_args)}"
    # cwd = the run directory, as on the local backend: ``python -m`` puts the cwd first on
    # sys.path, and the checkout's code must not shadow the run's code snapshot
    chdir = [f"--chdir={run.dir}"]
    prelude: List[str] = []

    def step(srun: List[str], inner: str) -> str:
        nonlocal prelude
        if container is None:
            return f"{shlex.join(srun)} {inner}"
        wrapped = containermod.wrap_step(
            container, srun, inner, run_dir=job.run_dir, data_root=str(plan.profile.data_root),
            code_dir=job.code_dir, stage_dir=str(stage_dir), uses_gpus=stage.resources.uses_gpus, relay=False)
        prelude = wrapped.prelude
        return wrapped.command

    if dreq.shell:
        srun = ["srun", *pty, *chdir, "--ntasks=1", "--nodes=1"]
        body = (f"export HPC_JOBS_DEBUG_CMD={shlex.quote(inner_cmd)}\n"
                f"echo \"hpc-jobs debug shell for stage {stage.name} (job $SLURM_JOB_ID). Run the stage: "
                f"\\$HPC_JOBS_DEBUG_CMD   (all ranks: srun --overlap \\$HPC_JOBS_DEBUG_CMD); exit to release.\"\n"
                f"{step(srun, 'bash -i')}")
    else:
        srun = ["srun", *pty, *chdir, "--unbuffered"]
        body = step(srun, inner_cmd)
    jobid_file = stage_dir / "debug.jobid"
    script = f"echo \"$SLURM_JOB_ID\" > {shlex.quote(str(jobid_file))}\n{body}"
    directives = [d for d in job.directives if d[0] in SALLOC_KEYS]
    directives = [(k, f"{v}.debug") if k == "job-name" else (k, v) for k, v in directives]
    debug_job = dataclasses.replace(job, command=script, script_path=str(stage_dir / "debug.sh"),
                                    directives=directives, array=None, dependencies=[],
                                    prelude=prelude, epilogue=[])
    if dreq.task is not None:  # what an array task sees in the batch job
        debug_job = dataclasses.replace(debug_job, env=[*debug_job.env, ("SLURM_ARRAY_TASK_ID", str(dreq.task))])
    text = rendermod.render(debug_job)
    text = text.replace(f"resubmit by hand with: sbatch {shlex.quote(debug_job.script_path)}",
                        "this is the debug variant of job.sbatch (python launch.py debug runs it under salloc)")
    from .fsutil import atomic_write_text

    atomic_write_text(stage_dir / "debug.sh", text, mode=0o700, fsync=False)
    salloc = ["salloc"] + [f"--{k}={v}" if v is not None else f"--{k}" for k, v in directives]
    salloc += ["bash", str(stage_dir / "debug.sh")]
    return DebugPlan(run, stage.name, "slurm", salloc, stage_dir / "debug.sh", [inner_cmd], {})


def _config_diff(src, run) -> str:
    import yaml

    try:
        a = yaml.safe_load((src.dir / "config.yaml").read_text()) or {}
        b = yaml.safe_load((run.dir / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        return ""
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:6])


def _local_env(run_dir: Path, stage: str) -> Dict[str, str]:
    env = dict(os.environ)
    code = str(run_dir / "code")
    env["PYTHONPATH"] = code + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HPC_JOBS_RUN_DIR"] = str(run_dir)
    env["HPC_JOBS_STAGE"] = stage
    env["PYTHONUNBUFFERED"] = "1"
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]  # not a Slurm task
    return env


def execute(dplan: DebugPlan, dreq: DebugRequest, echo: Callable[[str], None] = print) -> int:
    """Run the debug session in the foreground; record how it ended in run.json."""
    run = dplan.run
    rec = run.stage(dplan.stage)
    rec.state, rec.started, rec.attempts = "RUNNING", time.time(), 1
    run.save()
    if dplan.backend == "slurm":
        echo(f"debug run {run.id}: {' '.join(shlex.quote(a) for a in dplan.salloc)}")
        cmd = dplan.salloc
        env = None
    else:
        cmd = ["bash", "-i"] if dreq.shell else dplan.inner
        env = dplan.env
        echo(f"debug run {run.id}: stage {dplan.stage} here, in the foreground"
             + (" (shell; run the stage with $HPC_JOBS_DEBUG_CMD)" if dreq.shell else ""))
    try:
        code = subprocess.call(cmd, env=env, cwd=str(run.dir) if dplan.backend == "local" else None)
    except KeyboardInterrupt:
        code = 130
    run.reload()
    rec = run.stage(dplan.stage)
    jobid = run.stage_dir(dplan.stage) / "debug.jobid"
    if jobid.exists():
        rec.job_id = jobid.read_text().strip()
    from .runtime import read_marker

    marker = read_marker(run.stage_dir(dplan.stage), dreq.task)
    if dreq.shell and (not marker or marker.get("state") == "RUNNING"):
        state = "COMPLETED" if code == 0 else "FAILED"
        rec.reason = "interactive shell"
    elif marker and marker.get("state") in ("COMPLETED", "FAILED"):
        state = marker["state"]
    else:
        state = "COMPLETED" if code == 0 else "FAILED"
    rec.state, rec.ended, rec.exit_code = state, time.time(), code
    run.save()
    echo(f"debug run {run.id}: stage {dplan.stage} {state} (exit code {code}); "
         f"{command()} status {run.id}")
    return code


# -- inside the allocation -----------------------------------------------------------------------
def inner(argv: Optional[List[str]] = None) -> int:
    """``python -m hpc_jobs.debug inner RUN_DIR STAGE [--task I] [--break] [--post-mortem]``: the
    stage runner (as ``python -m hpc_jobs.runtime`` runs it), with pdb on rank 0 if asked."""
    import argparse
    import logging
    import pickle
    import traceback

    from .errors import StageInputError
    from .runtime import RUNNER_FILE

    p = argparse.ArgumentParser(prog="python -m hpc_jobs.debug inner")
    p.add_argument("run_dir")
    p.add_argument("stage")
    p.add_argument("--task", type=int, default=None)
    p.add_argument("--break", dest="brk", action="store_true")
    p.add_argument("--post-mortem", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(Path(args.run_dir) / "stages" / args.stage / RUNNER_FILE, "rb") as fh:
        runner = pickle.load(fh)
    runner = runner.for_task(args.task)
    rank0 = os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) in ("0", "")
    if args.brk and rank0:
        import pdb

        fn = runner.fn

        def stopped(ctx, _fn=fn):
            print(f"[hpc_jobs debug] stopped at the start of {getattr(_fn, '__qualname__', _fn)}: "
                  f"'n' next line, 's' step in, 'c' continue, 'q' quit", flush=True)
            return pdb.Pdb().runcall(_fn, ctx)

        runner.fn = stopped
    try:
        runner()
    except StageInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except Exception:
        traceback.print_exc()
        if args.post_mortem and rank0:
            import pdb

            pdb.post_mortem(sys.exc_info()[2])
        return 1
    print(f"[hpc_jobs debug] stage {args.stage} completed", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "inner":
        sys.exit(inner(sys.argv[2:]))
    print(f"usage: {command()} debug WORKFLOW --stage STAGE [...]", file=sys.stderr)
    sys.exit(2)
