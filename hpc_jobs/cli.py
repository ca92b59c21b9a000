"""``python launch.py``: launch a workflow, then watch, read, cancel and resume its run from any shell.

Errors the user can fix print one line and exit with code 2 before anything is submitted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional

from .errors import UserError

COMMANDS = ("list", "status", "logs", "cancel", "resume", "profiles")

TOP_HELP = """\
usage: python launch.py WORKFLOW [options]      launch a workflow (python launch.py WORKFLOW --help)
       python launch.py list                    the workflows, one line each
       python launch.py status [RUN] [--json]   stage states of a run (no RUN: the recent runs)
       python launch.py logs RUN [STAGE] [-f]   print (or follow) a stage's log
       python launch.py cancel RUN [STAGE ...]  cancel a run's jobs
       python launch.py resume RUN              resubmit what did not complete (and its descendants)
       python launch.py profiles                the cluster profiles

hpc-jobs renders each stage of a research pipeline as an sbatch script, submits the stages with
dependencies through submitit and hands checkpoints from stage to stage. With no Slurm on the
machine the same pipeline runs locally. RUN is a run id, a run directory, or 'last'.
"""


def _echo(line: str) -> None:
    print(line, flush=True)


# -- launch --------------------------------------------------------------------------------------
def launch_parser(workflow: str, summary: str = "", keys: Optional[List[str]] = None, presets=()) -> argparse.ArgumentParser:
    epilog = ""
    if keys:
        epilog = "config keys (--set KEY=VALUE): " + ", ".join(keys)
    p = argparse.ArgumentParser(
        prog=f"python launch.py {workflow}",
        description=summary or f"Launch the {workflow} workflow.",
        epilog=epilog,
    )
    p.add_argument("--gpus", type=int, default=None, metavar="N", help="GPUs per node for GPU stages (default: the workflow's, usually 1; locally: N ranks)")
    p.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes for multi-node stages (default 1)")
    p.add_argument("--cluster", default="auto", metavar="NAME", help="cluster profile: auto (default), local, devcluster, discovery, generic, or your own")
    p.add_argument("--partition", metavar="P", help="partition for the GPU stages (default: the profile's)")
    p.add_argument("--account", metavar="A", help="Slurm account charged for every job (required on some clusters)")
    p.add_argument("--time", metavar="T", help="time limit of the GPU stages, e.g. 02:00:00")
    p.add_argument("--gpu-type", metavar="TYPE", help="GPU type in the GRES request, e.g. v100, a100")
    p.add_argument("--preset", choices=sorted(presets) or None, help="a named set of config values")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--config", metavar="FILE", help="YAML file of config values (applied before --set)")
    p.add_argument("--run-name", metavar="NAME", help="run id (default: a timestamp)")
    p.add_argument("--dry-run", action="store_true", help="write and print every stage's sbatch script; submit nothing")
    p.add_argument("--follow", action="store_true", help="stay and show status until the run ends")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def cmd_launch(workflow: str, argv: List[str]) -> int:
    from . import config as cfgmod
    from . import workflow as wfmod
    from .launch import LaunchRequest, launch

    wf = wfmod.get(workflow)
    parser = launch_parser(workflow, wf.summary, wf.config_keys(), wf.presets)
    args = parser.parse_args(argv)
    overrides: Dict[str, Any] = {}
    for item in args.sets:
        key, value = cfgmod.parse_assignment(item)
        overrides[key] = value
    options = wfmod.LaunchOptions(
        gpus=args.gpus if args.gpus is not None else 1,
        nodes=args.nodes,
        partition=args.partition,
        account=args.account,
        time=args.time,
        gpu_type=args.gpu_type,
    )
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: give at least 1 (a workflow's CPU stages need no --gpus)")
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: give at least 1")
    req = LaunchRequest(
        workflow=workflow,
        cluster=args.cluster,
        options=options,
        preset=args.preset,
        config_file=args.config,
        overrides=overrides,
        run_name=args.run_name,
        dry_run=args.dry_run,
        argv=["launch.py", workflow, *argv],
    )
    quiet = args.json
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if quiet else _echo
    result = launch(req, echo=echo)
    run = result.run
    if args.json:
        print(json.dumps(_launch_json(result), indent=2))
    elif args.dry_run:
        for name, texts in result.scripts.items():
            for text in texts:
                print(f"# ---- {name} " + "-" * 60)
                print(text)
        print(f"dry run: scripts written under {run.dir}/stages/*/job.sbatch; nothing submitted")
    else:
        _print_launch(result)
    if args.follow and result.run and result.plan.profile.backend == "slurm" and not args.dry_run:
        return _follow(result.run)
    return 1 if result.failed else 0


def _launch_json(result) -> Dict[str, Any]:
    run = result.run
    stages = []
    for name in run.record["order"]:
        entry = run.stage(name)
        jobs = entry.get("jobs", [])
        stages.append({
            "name": name,
            "job_id": jobs[0]["job_id"] if jobs else None,
            "job_ids": [j["job_id"] for j in jobs],
            "depends_on": entry["depends_on"],
            "script": entry.get("script"),
            "where": entry["where"],
            "state": entry.get("state"),
        })
    return {
        "run": run.id,
        "run_dir": str(run.dir),
        "backend": result.plan.profile.backend,
        "cluster": result.plan.profile.name,
        "dry_run": bool(run.record.get("dry_run")),
        "stages": stages,
        "failed": result.failed,
    }


def _print_launch(result) -> None:
    from .status import stage_states

    run = result.run
    rows = []
    states = stage_states(run) if result.plan.profile.backend == "local" else {}
    for name in run.record["order"]:
        entry = run.stage(name)
        jobs = ",".join(str(j["job_id"]) for j in entry.get("jobs", [])) or ("-" if entry["where"] == "batch" else entry["where"])
        state = entry.get("state", "")
        extra = ""
        if name in states and states[name].result:
            extra = _fmt_result(states[name].result)
        rows.append((name, jobs, ",".join(entry["depends_on"]) or "-", state, extra))
    print(f"\nrun {run.id} ({result.plan.workflow.name} on {result.plan.profile.name}): {run.dir}")
    _table(["stage", "job", "after", "state", "result"], rows)
    print(f"\nnext: python launch.py status {run.id}   |   python launch.py logs {run.id} STAGE -f"
          f"   |   python launch.py cancel {run.id}   |   python launch.py resume {run.id}")


def _fmt_result(result: Any) -> str:
    if isinstance(result, dict):
        parts = []
        for k, v in result.items():
            if isinstance(v, float):
                parts.append(f"{k}={v:.4f}")
            elif isinstance(v, (int, str)) and len(str(v)) < 40:
                parts.append(f"{k}={v}")
        return " ".join(parts)
    return str(result)[:60]


def _table(header: List[str], rows: List[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    for row in rows:
        print(fmt.format(*[str(x) for x in row]))


def _follow(run) -> int:
    from .slurm import FINAL_STATES
    from .status import stage_states

    last = None
    while True:
        states = stage_states(run)
        summary = " ".join(f"{n}={s.state}" for n, s in states.items())
        if summary != last:
            print(time.strftime("%H:%M:%S"), summary, flush=True)
            last = summary
        if all(s.state in FINAL_STATES or s.state == "COMPLETED" for s in states.values()):
            return 0 if all(s.state == "COMPLETED" for s in states.values()) else 1
        time.sleep(5)


# -- other commands ------------------------------------------------------------------------------
def cmd_list(argv: List[str]) -> int:
    from . import workflow as wfmod

    argparse.ArgumentParser(prog="python launch.py list", description="List the workflows.").parse_args(argv)
    workflows = wfmod.discover()
    width = max((len(n) for n in workflows), default=0)
    for name, cls in workflows.items():
        print(f"{name:<{width}}  {cls.summary}")
    return 0


def cmd_profiles(argv: List[str]) -> int:
    from . import profiles

    argparse.ArgumentParser(prog="python launch.py profiles").parse_args(argv)
    detected = profiles.detect()
    for name, path in profiles.available().items():
        mark = "*" if name == detected else " "
        print(f"{mark} {name:<12} {profiles.load(name).description}  ({path})")
    print("(* = what --cluster auto picks on this machine)")
    return 0


def cmd_status(argv: List[str]) -> int:
    from .ledger import find_run, recent_runs
    from .status import stage_states

    p = argparse.ArgumentParser(prog="python launch.py status", description="Stage states of a run.")
    p.add_argument("run", nargs="?", help="run id, run directory or 'last' (default: list recent runs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.run:
        runs = recent_runs(10)
        if args.json:
            print(json.dumps([{"run": r.id, "workflow": r.workflow, "run_dir": str(r.dir),
                               "created": r.record.get("created")} for r in runs], indent=2))
            return 0
        if not runs:
            print("no runs yet: python launch.py list, then python launch.py WORKFLOW")
            return 0
        rows = []
        for r in runs:
            states = stage_states(r)
            counts: Dict[str, int] = {}
            for s in states.values():
                counts[s.state] = counts.get(s.state, 0) + 1
            rows.append((r.id, r.workflow, r.record.get("cluster", ""), " ".join(f"{k}:{v}" for k, v in counts.items())))
        _table(["run", "workflow", "cluster", "stages"], rows)
        return 0
    run = find_run(args.run)
    states = stage_states(run)
    if args.json:
        print(json.dumps({"run": run.id, "run_dir": str(run.dir), "workflow": run.workflow,
                          "backend": run.record.get("backend"), "cluster": run.record.get("cluster"),
                          "stages": [s.as_dict() for s in states.values()]}, indent=2, default=str))
        return 0
    rows = []
    for s in states.values():
        progress = ""
        if s.progress and s.progress.get("total_steps"):
            progress = f"{s.progress.get('step', 0)}/{s.progress['total_steps']}"
        note = s.error or (s.reason if s.reason not in ("None", "") else "") or (_fmt_result(s.result) if s.result else "")
        if s.tasks:
            note = " ".join(f"{k}:{v}" for k, v in s.tasks.items()) + (f"  {note}" if note else "")
        rows.append((s.name, s.state, ",".join(s.job_ids) or "-", s.elapsed or "-", s.exit_code or "-", progress, note[:100]))
    print(f"run {run.id} ({run.workflow} on {run.record.get('cluster')}): {run.dir}")
    _table(["stage", "state", "job", "elapsed", "exit", "progress", "note"], rows)
    return 0


def cmd_logs(argv: List[str]) -> int:
    from .ledger import find_run
    from .status import log_files

    p = argparse.ArgumentParser(prog="python launch.py logs", description="Print or follow a stage's log.")
    p.add_argument("run")
    p.add_argument("stage", nargs="?", help="default: the last stage that started")
    p.add_argument("--task", type=int, help="array task index")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    p.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    args = p.parse_args(argv)
    run = find_run(args.run)
    stage = args.stage
    if stage is None:
        started = [n for n in run.record["order"] if log_files(run, n)]
        if not started:
            raise UserError(f"run {run.id}: no stage has written a log yet")
        stage = started[-1]
    files = log_files(run, stage, args.task)
    if not files:
        raise UserError(f"run {run.id}: stage '{stage}' has no log yet (python launch.py status {run.id})")
    for path in files:
        if len(files) > 1:
            print(f"==> {path} <==")
        lines = path.read_text(errors="replace").splitlines()
        if args.lines:
            lines = lines[-args.lines:]
        for line in lines:
            print(line)
    if args.follow:
        path = files[0]
        with open(path, errors="replace") as fh:
            fh.seek(0, 2)
            try:
                while True:
                    line = fh.readline()
                    if line:
                        print(line, end="", flush=True)
                    else:
                        time.sleep(0.5)
            except KeyboardInterrupt:
                return 0
    return 0


def cmd_cancel(argv: List[str]) -> int:
    from .ledger import find_run
    from .status import cancel

    p = argparse.ArgumentParser(prog="python launch.py cancel", description="Cancel a run's jobs (or some stages').")
    p.add_argument("run")
    p.add_argument("stages", nargs="*")
    args = p.parse_args(argv)
    run = find_run(args.run)
    for name in args.stages:
        run.stage(name)
    with run.lock("cancel"):
        ids = cancel(run, args.stages or None)
    print(f"cancelled {len(ids)} job(s) of run {run.id}: {' '.join(ids) or '(none submitted)'}")
    return 0


def cmd_resume(argv: List[str]) -> int:
    from .launch import resume
    from .ledger import find_run

    p = argparse.ArgumentParser(prog="python launch.py resume",
                                description="Resubmit the stages that did not complete, and their descendants.")
    p.add_argument("run")
    args = p.parse_args(argv)
    run = find_run(args.run)
    failed = resume(run, echo=_echo)
    cmd_status([run.id])
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(TOP_HELP)
            return 0 if argv else 2
        command, rest = argv[0], argv[1:]
        handlers = {"list": cmd_list, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel,
                    "resume": cmd_resume, "profiles": cmd_profiles}
        if command in handlers:
            return handlers[command](rest)
        if command.startswith("-"):
            raise UserError(f"'{command}' is an option, but a workflow or command must come first (python launch.py list)")
        return cmd_launch(command, rest)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
