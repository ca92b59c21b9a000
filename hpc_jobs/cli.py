"""``python launch.py``: launch a workflow, then watch, read, cancel and resume its run from any shell.

Errors the user can fix print one line and exit with code 2 before anything is submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UserError, command

COMMANDS = ("list", "run", "status", "logs", "cancel", "resume", "profiles", "debug", "report", "new", "completion")

TOP_HELP = """\
usage: python launch.py WORKFLOW [options]      launch a workflow (python launch.py WORKFLOW --help)
       python launch.py run [options] -- CMD ARGS
                                                your own command as a one-stage pipeline (requeue on
                                                the time limit; it gets $HPC_JOBS_CHECKPOINT_DIR)
       python launch.py list                    the workflows, one line each, with where each comes from
       python launch.py status [RUN [STAGE]] [--watch] [--json]
                                                stages, progress, failures of a run (no RUN: recent
                                                runs; STAGE: an array's tasks)
       python launch.py logs RUN [STAGE] [-f] [--task I] [--attempt N]
                                                print (or follow) a stage's log
       python launch.py cancel RUN [STAGE ...] [--task I]
                                                cancel a run's jobs (one task of an array)
       python launch.py resume RUN [--follow]   rerun what did not complete (only those tasks of an
                                                array) and what depends on it; run waiting login steps
       python launch.py debug WORKFLOW --stage S [--from-run RUN] [--shell] [--break]
                                                run one stage interactively in an allocation (salloc)
       python launch.py report RUN              write report.md: stage table, timings, curves, metrics
       python launch.py profiles                the cluster profiles
       python launch.py new WORKFLOW [--dir D]  write D/WORKFLOW.py, a workflow skeleton that launches as it is
       python launch.py completion bash         a bash completion script: eval "$(hpc-jobs completion bash)"
       python launch.py --version

`hpc-jobs` (the installed command), `python -m hpc_jobs` and a checkout's launch.py are one command. Workflows come from the
shipped `launchers` package, from HPC_JOBS_LAUNCHERS (packages, modules or .py paths, comma-
separated) and from installed packages' `hpc_jobs.workflows` entry points.

hpc-jobs renders each stage of a research pipeline as an sbatch script, submits the stages with
dependencies through submitit and hands checkpoints from stage to stage. With no Slurm on the
machine the same pipeline runs locally. RUN is a run id, a run directory, or 'last'.
"""


def top_help() -> str:
    """TOP_HELP in the words of the command the user ran (``hpc-jobs`` or ``python launch.py``)."""
    prog, lines = command(), []
    for line in TOP_HELP.splitlines():
        m = re.match(r"^(usage: |       )python launch\.py(.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            head = m.group(1) + prog + m.group(2)
            line = (head.ljust(47) + " " + m.group(3) if m.group(3) else head).replace("python launch.py", prog)
        lines.append(line)
    return "\n".join(lines) + "\n"


def _echo(line: str) -> None:
    print(line, flush=True)


# -- launch --------------------------------------------------------------------------------------
def launch_parser(workflow: str, summary: str = "", keys: Optional[List[str]] = None, presets=()) -> argparse.ArgumentParser:
    epilog = ""
    if keys:
        epilog = ("config keys (--set KEY=VALUE; --show-config shows the resolved values and where each comes from):\n  "
                  + "\n  ".join(keys))
    p = argparse.ArgumentParser(
        prog=f"{command()} {workflow}",
        description=summary or f"Launch the {workflow} workflow.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpus", type=int, default=None, metavar="N", help="GPUs per node for GPU stages (default: the workflow's, usually 1; locally: N ranks)")
    p.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes for multi-node stages (default 1)")
    p.add_argument("--cluster", default="auto", metavar="NAME", help="cluster profile: auto (default), local, devcluster, discovery, generic, or your own")
    p.add_argument("--partition", metavar="P", help="partition for the GPU stages (default: the profile's)")
    p.add_argument("--account", metavar="A", help="Slurm account charged for every job (required on some clusters)")
    p.add_argument("--time", metavar="T", help="time limit of the GPU stages, e.g. 02:00:00")
    p.add_argument("--gpu-type", metavar="TYPE", help="GPU type in the GRES request, e.g. v100, a100")
    s = p.add_argument_group("sbatch options", "applied to the GPU stages (to every batch stage when none uses GPUs), like --time")
    s.add_argument("--mem", metavar="SIZE", help="memory per node, e.g. 64G")
    s.add_argument("--cpus-per-task", type=int, metavar="N", help="CPUs per task (per GPU rank)")
    s.add_argument("--qos", metavar="QOS", help="quality of service")
    s.add_argument("--constraint", metavar="FEATURES", help="node features, e.g. 'a100&ib'")
    s.add_argument("--exclude", metavar="NODES", help="nodes to avoid, e.g. 'd05-[10-12]'")
    s.add_argument("--mail-type", metavar="TYPES", help="Slurm's e-mail on events: END,FAIL / ALL / TIME_LIMIT_80 ...")
    s.add_argument("--mail-user", metavar="ADDRESS", help="where Slurm sends that e-mail (default: you)")
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, validated (e.g. --sbatch reservation=r1); repeatable")
    s.add_argument("--stage-set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="one stage's resources, e.g. --stage-set train.mem=64G --stage-set prepare.time=04:00:00")
    r = p.add_argument_group("right-sizing", "each batch stage's --mem, --time and CPUs from earlier runs' peaks "
                             "(x1.5 margin; x2 after OUT_OF_MEMORY/TIMEOUT; within the partition's limits)")
    r.add_argument("--right-size", action="store_true",
                   help="from the newest completed runs of this workflow and preset on this cluster")
    r.add_argument("--resources-from", metavar="RUN", help="from that run (a run id, directory or 'last')")
    p.add_argument("--container", metavar="IMAGE", help="run every batch stage in this image: .sif (apptainer), squashfs or registry#image (pyxis), OCI bundle dir (docs/containers.md)")
    p.add_argument("--container-runtime", metavar="RT", help="apptainer, singularity, pyxis or oci (default: the profile's, or from the image)")
    p.add_argument("--preset", choices=sorted(presets) or None, help="a named set of config values")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--config", metavar="FILE", help="YAML file of config values (applied before --set)")
    p.add_argument("--run-name", metavar="NAME", help="run id (default: a timestamp)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="run the pipeline once per point of the grid of these values (repeatable: the product), as arrays")
    p.add_argument("--sweep-from", metavar="STAGE", help="the first stage the sweep changes (default: the workflow's, or its first GPU stage)")
    p.add_argument("--sweep-parallel", type=int, metavar="N", help="at most N points run at once (the array's %%N)")
    p.add_argument("--dry-run", action="store_true", help="write and print every stage's sbatch script; submit nothing")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (value, type, and where it came from: default, preset, --config, --set); run nothing")
    p.add_argument("--follow", action="store_true", help="stay and show status until the run ends")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _sbatch_pair(item: str) -> tuple:
    key, eq, value = item.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise UserError(f"--sbatch '{item}' is not KEY=VALUE (e.g. --sbatch reservation=r1)")
    return (key, value.strip()) if eq else (key, "")


def _launch_request(workflow: str, args: argparse.Namespace, argv: List[str], prefix: List[str]):
    from . import config as cfgmod
    from . import workflow as wfmod
    from .launch import LaunchRequest

    overrides: Dict[str, Any] = {}
    for item in args.sets:
        key, value = cfgmod.parse_assignment(item)
        overrides[key] = value
    options = wfmod.LaunchOptions(
        gpus=args.gpus if args.gpus is not None else 1,
        gpus_given=args.gpus is not None,
        nodes=args.nodes,
        partition=args.partition,
        account=args.account,
        time=args.time,
        gpu_type=args.gpu_type,
        mem=args.mem, cpus_per_task=args.cpus_per_task, qos=args.qos, constraint=args.constraint,
        exclude=args.exclude, mail_type=args.mail_type, mail_user=args.mail_user,
        sbatch=tuple(_sbatch_pair(item) for item in args.sbatch), stage_sets=tuple(args.stage_set),
        container=args.container, container_runtime=args.container_runtime,
    )
    if args.sweep_parallel is not None and args.sweep_parallel < 1:
        raise UserError(f"--sweep-parallel {args.sweep_parallel}: give at least 1")
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: give at least 1 (a workflow's CPU stages need no --gpus)")
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: give at least 1")
    return LaunchRequest(
        workflow=workflow,
        cluster=args.cluster,
        options=options,
        preset=args.preset,
        config_file=args.config,
        overrides=overrides,
        run_name=args.run_name,
        dry_run=args.dry_run,
        argv=[*prefix, workflow, *argv],
        sweep=list(args.sweep), sweep_from=args.sweep_from, sweep_parallel=args.sweep_parallel,
        right_size=args.right_size, resources_from=args.resources_from,
    )


def cmd_run(argv: List[str]) -> int:
    """``run [launch options] -- CMD ARGS``: wrap a command (hpc_jobs/command.py)."""
    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            return cmd_launch("run", argv)
        raise UserError(f"run: give the command after --, e.g. {command()} run --gpus 1 --time 04:00:00 "
                        "-- python train.py --lr 1e-3")
    cut = argv.index("--")
    options, wrapped = argv[:cut], argv[cut + 1:]
    if not wrapped:
        raise UserError("run: nothing after --: give the command to run, e.g. -- python train.py")
    return cmd_launch("run", options, extra_overrides={"command": wrapped, "workdir": os.getcwd()},
                      shown_argv=argv)


def cmd_launch(workflow: str, argv: List[str], extra_overrides: Optional[Dict[str, Any]] = None,
               shown_argv: Optional[List[str]] = None) -> int:
    from . import workflow as wfmod
    from .launch import launch

    wf = wfmod.get(workflow)
    parser = launch_parser(workflow, wf.summary, wf.config_help(), wf.presets)
    args = parser.parse_args(argv)
    req = _launch_request(workflow, args, shown_argv or argv, ["launch.py"])
    req.workflow_class = wf  # looked up (and checked for clashes) above
    if extra_overrides:
        req.overrides.update(extra_overrides)
    if args.show_config:
        return _show_config(wf, req, as_json=args.json)
    quiet = args.json
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if quiet else _echo
    result = launch(req, echo=echo)
    run = result.run
    if result.plan.profile.backend == "slurm" and not args.dry_run:
        from . import poller

        poller.invalidate()  # new jobs: the next status read asks the scheduler soon
    sized = result.plan.right_sized.lines(workflow) if result.plan.right_sized else []
    if args.json:
        for line in sized:
            echo(line)
        print(json.dumps(_launch_json(result), indent=2))
    elif args.dry_run:
        for name, texts in result.scripts.items():
            for text in texts:
                print(f"# ---- {name} " + "-" * 60)
                print(text)
        for line in sized:
            print(line)
        print(f"dry run: scripts written under {run.dir}/stages/*/job.sbatch; nothing submitted")
    else:
        for line in sized:
            print(line)
        _print_launch(result)
    if args.follow and result.run and result.plan.profile.backend == "slurm" and not args.dry_run:
        return _follow(result.run)
    return 1 if result.failed else 0


def _show_config(wf, req, as_json: bool = False) -> int:
    from . import config as cfgmod

    preset = req.preset or wf.choose_preset(req.config_file, req.overrides)
    cfg = wf.make_config(preset, req.config_file, req.overrides)
    sources = wf.config_sources(preset, req.config_file, req.overrides)
    types = cfgmod.leaf_types(wf.Config)
    values = cfgmod.flatten(cfg)
    if as_json:
        print(json.dumps({"workflow": wf.name, "preset": preset, "config": {
            k: {"value": values[k], "type": cfgmod.type_name(types[k]), "source": sources[k]} for k in sorted(values)}},
            indent=2, default=str))
        return 0
    print(f"{wf.name} config (preset: {preset or 'none'}):")
    _table(["key", "value", "type", "from"], [(k, repr(values[k]), cfgmod.type_name(types[k]), sources[k]) for k in sorted(values)])
    return 0


def _launch_json(result) -> Dict[str, Any]:
    from .schema import run_document
    from .status import stage_states

    return run_document(result.run, stage_states(result.run, triage=False))


def _print_launch(result) -> None:
    from .status import stage_states

    run = result.run
    rows = []
    states = stage_states(run) if result.plan.profile.backend == "local" else {}
    for rec in run.in_order():
        name = rec.name
        jobs = ",".join(rec.job_ids()) or ("-" if rec.where == "batch" else rec.where)
        state = states[name].state if name in states else rec.state
        extra = ""
        if name in states and states[name].result:
            extra = _fmt_result(states[name].result)
        elif rec.state in ("WAITING_LOGIN", "PLANNED") and rec.reason:
            extra = rec.reason
        rows.append((name, jobs, ",".join(rec.depends_on) or "-", state, extra))
    print(f"\nrun {run.id} ({result.plan.workflow.name} on {result.plan.profile.name}): {run.dir}")
    _table(["stage", "job", "after", "state", "result"], rows)
    if run.record.get("sweep") and states:
        _console().print(render_sweep(run.record["sweep"], states))
    prog = command()
    print(f"\nnext: {prog} status {run.id}   |   {prog} logs {run.id} STAGE -f"
          f"   |   {prog} cancel {run.id}   |   {prog} resume {run.id}")


def _fmt_result(result: Any) -> str:
    """A stage's result as ``key=value`` words: floats to 4 places, nested dicts as ``outer.key``."""
    if isinstance(result, dict):
        parts = []

        def add(prefix: str, items: Dict[str, Any]) -> None:
            for k, v in items.items():
                if isinstance(v, bool):
                    parts.append(f"{prefix}{k}={v}")
                elif isinstance(v, float):
                    parts.append(f"{prefix}{k}={v:.4f}")
                elif isinstance(v, (int, str)) and len(str(v)) < 40:
                    parts.append(f"{prefix}{k}={v}")
                elif isinstance(v, dict) and not prefix:  # one level: {"out_of_fold": {"ensemble": 0.24}}
                    add(f"{k}.", v)

        add("", result)
        return " ".join(parts)
    return str(result)[:60]


def _table(header: List[str], rows: List[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    for row in rows:
        print(fmt.format(*[str(x) for x in row]))


def _follow(run) -> int:
    """Print each change of the stages' states until the run ends; a login step whose parents
    completed runs here (this is the login node), then what waited for it is submitted."""
    from . import states as statesmod
    from .launch import advance_login_steps
    from .status import stage_states

    last = None
    while True:
        states = stage_states(run)
        summary = " ".join(f"{n}={s.state}" + (f"({s.task_counts})" if s.task_list and s.state != "COMPLETED" else "")
                           for n, s in states.items())
        if summary != last:
            print(time.strftime("%H:%M:%S"), summary, flush=True)
            last = summary
        waiting = [n for n, s in states.items() if s.state == "WAITING_LOGIN"]
        if waiting and not any(s.state in statesmod.ACTIVE for n, s in states.items()
                               if n in set(a for w in waiting for a in run.ancestors(w))):
            with run.lock("follow"):
                if advance_login_steps(run, _echo):
                    continue
        if all(s.state in statesmod.FINAL for s in states.values()) or (
                not waiting and not any(s.state in statesmod.ACTIVE for s in states.values())
                and not any(s.state == "UNKNOWN" for s in states.values())):
            return 0 if all(s.state in statesmod.DONE for s in states.values()) else 1
        time.sleep(5)


# -- other commands ------------------------------------------------------------------------------
def cmd_list(argv: List[str]) -> int:
    from . import workflow as wfmod

    argparse.ArgumentParser(prog=f"{command()} list", description="List the workflows and where each comes from "
                            "(shipped, HPC_JOBS_LAUNCHERS, or an installed distribution's entry point).").parse_args(argv)
    workflows = wfmod.discover()
    width = max((len(n) for n in workflows), default=0)
    swidth = max((len(wfmod.source(n)) for n in workflows), default=0)
    for name, cls in workflows.items():
        print(f"{name:<{width}}  {wfmod.source(name):<{swidth}}  {cls.summary}")
    return 0


def cmd_new(argv: List[str]) -> int:
    from .scaffold import write

    p = argparse.ArgumentParser(prog=f"{command()} new",
                                description="Write DIR/WORKFLOW.py: a config dataclass, three stages with an init "
                                            "handoff and a tiny preset, ready to launch (docs/writing-a-workflow.md).")
    p.add_argument("workflow", help="the new workflow's name (also its module's): lower-case letters, digits, _")
    p.add_argument("--dir", default=".", help="where to write it (default: here)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = p.parse_args(argv)
    path = write(args.workflow, Path(args.dir), force=args.force)
    shown = f"./{path.name}" if path.parent == Path.cwd().resolve() else str(path)
    print(f"wrote {path}\nlaunch it here:\n  HPC_JOBS_LAUNCHERS={shown} hpc-jobs {args.workflow} --cluster local\n"
          f"(or `python launch.py` in place of `hpc-jobs`; docs/writing-a-workflow.md: packaging it, entry points)")
    return 0


def cmd_completion(argv: List[str]) -> int:
    from .completion import BASH

    p = argparse.ArgumentParser(prog=f"{command()} completion", description=(
        "Print a shell completion script (workflows, sub-commands, run ids, stages, options, config "
        "keys). bash: eval \"$(hpc-jobs completion bash)\" in ~/.bashrc; zsh: autoload bashcompinit && "
        "bashcompinit first."))
    p.add_argument("shell", choices=["bash"])
    p.parse_args(argv)
    print(BASH, end="")
    return 0


def cmd_profiles(argv: List[str]) -> int:
    from . import profiles

    argparse.ArgumentParser(prog=f"{command()} profiles").parse_args(argv)
    detected = profiles.detect()
    for name, path in profiles.available().items():
        mark = "*" if name == detected else " "
        print(f"{mark} {name:<12} {profiles.load(name).description}  ({path})")
    print("(* = what --cluster auto picks on this machine)")
    return 0


# -- status --------------------------------------------------------------------------------------
STATE_STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "SUBMITTED": "yellow",
               "REQUEUED": "yellow", "PREEMPTED": "yellow", "FAILED": "bold red", "TIMEOUT": "bold red",
               "OUT_OF_MEMORY": "bold red", "NODE_FAIL": "bold red", "CANCELLED": "red", "UNKNOWN": "magenta",
               "SKIPPED": "dim", "PLANNED": "dim"}


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _unicode_ok() -> bool:
    enc = (getattr(sys.stdout, "encoding", None) or "").lower()
    return enc.startswith("utf")


def progress_bar(fraction: float, width: int = 16, unicode: Optional[bool] = None) -> str:
    """``█████░░░░░`` (or ``#####-----`` where the terminal is not UTF-8)."""
    unicode = _unicode_ok() if unicode is None else unicode
    full, empty = ("█", "░") if unicode else ("#", "-")
    fraction = max(0.0, min(1.0, fraction))
    done = int(round(fraction * width))
    return full * done + empty * (width - done)


def progress_cell(st, unicode: Optional[bool] = None) -> str:
    """Bar, percent, step/total, ETA (while running) and a stale flag, from the parsed heartbeat."""
    p = st.progress
    if not p:
        return ""
    if p.get("unreadable"):
        return "(heartbeat unreadable)"
    parts: List[str] = []
    fraction = p.get("fraction")
    step, total = p.get("step"), p.get("total_steps", p.get("total"))
    if fraction is not None:
        if st.state == "COMPLETED":
            fraction, step = 1.0, total
        try:
            counts = f"{int(float(step))}/{int(float(total))}"
        except (TypeError, ValueError):
            counts = ""
        parts.append(f"{progress_bar(fraction, unicode=unicode)} {fraction * 100:3.0f}% {counts}")
    elif isinstance(step, (int, float)):
        parts.append(f"step {int(step)}")
    if st.state == "RUNNING" and p.get("eta_s") is not None and not p.get("stale"):
        parts.append(f"ETA {_duration(p['eta_s'])}")
    if p.get("stale"):
        parts.append(f"STALE: no heartbeat for {_duration(p.get('age_s'))}")
    if p.get("phase") and st.state == "RUNNING" and p.get("phase") not in ("train",):
        parts.append(f"({p['phase']})")
    return " ".join(parts)


def _note(st) -> str:
    notes: List[str] = []
    if st.handoff:
        notes.append(f"[{st.handoff}]")
    if st.task_list:
        notes.append(st.task_counts)
    if st.reason and st.reason not in ("None",) and st.state != "RUNNING":
        notes.append(f"({st.reason})")
    if st.metric:
        notes.append(st.metric)
    elif st.result and st.state == "COMPLETED":
        notes.append(_fmt_result(st.result))
    if st.error and not st.hint:
        notes.append(st.error[:80])
    if st.interruptions:
        notes.append(interruptions_note(st.interruptions))
    return "  ".join(notes)


def interruptions_note(items: List[Dict[str, Any]]) -> str:
    """``interrupted 2x: TIMEOUT@step 34, PREEMPTED@step 74`` (the last four causes)."""
    words = []
    for i in items[-4:]:
        where = f"@step {i['step']}" if i.get("step") is not None else ""
        task = f"[{i['task']}]" if i.get("task") is not None else ""
        words.append(f"{i.get('cause') or 'UNKNOWN'}{task}{where}")
    more = ", ..." if len(items) > 4 else ""
    return f"interrupted {len(items)}x: " + ", ".join(words) + more


#: below this many columns the status table drops the node column, shows progress as a percent
#: (no bar) and cuts notes with an ellipsis, so no word is ever broken across lines
COMPACT_BELOW = 120


def render_status(run, states, footer: str = "", width: Optional[int] = None, efficiency=None):
    """The status table (rich) plus, for each failed stage, its Slurm state, exit code, hint and
    the last lines of its error log. ``width``: the terminal's; a narrow one gets a compact table.
    ``efficiency`` (hpc_jobs.efficiency.RunEfficiency): a line per stage that used little of what
    it asked (memory, time, GPUs)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    compact = width is not None and width < COMPACT_BELOW
    title = f"run {run.id} ({run.workflow} on {run.record.get('cluster')})" + ("  [debug run]" if run.record.get("debug") else "")
    table = Table(title=Text(title, overflow="ellipsis", no_wrap=True), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, expand=False)
    columns = ("stage", "state", "job", "elapsed", "progress", "note") if compact else \
        ("stage", "state", "job", "node", "elapsed", "progress", "last metric / note")
    rows = []
    for st in states.values():
        jobs = ",".join(st.job_ids) or ("-" if st.where == "batch" else st.where or "-")
        cells = [Text(st.name), Text(st.state, style=STATE_STYLE.get(st.state, "")), Text(jobs)]
        if not compact:
            cells.append(Text(st.node or "-"))
        cells += [Text(st.elapsed or "-"), Text(_short_progress(st) if compact else progress_cell(st)), Text(_note(st))]
        rows.append(cells)
    widths = [max([len(col)] + [len(r[i].plain) for r in rows]) for i, col in enumerate(columns[:-1])]
    for i, col in enumerate(columns):
        if i == len(columns) - 1:  # the note takes what is left; cut between words when narrow
            table.add_column(col, overflow="fold", no_wrap=compact)
        else:  # never broken: as wide as its widest cell
            table.add_column(col, no_wrap=True, min_width=widths[i])
    room = (width or 10 ** 6) - sum(w + 3 for w in widths) - 2
    for cells in rows:
        if compact:
            cells[-1] = Text(_cut_words(cells[-1].plain, room))
        table.add_row(*cells)
    parts: List[Any] = [table]
    for st in states.values():
        if not st.hint and not st.log_tail:
            continue
        head = Text(f"{st.name}: ", style="bold")
        head.append(f"{st.raw_state or st.state}", style=STATE_STYLE.get(st.state, ""))
        head.append(f"  exit code {st.exit_code or '-'}")
        if st.error:
            head.append(f"  {st.error[:160]}")
        parts.append(head)
        if st.hint:
            parts.append(Text(f"  hint: {st.hint['hint']}", style="bold yellow"))
        if st.log_tail:
            parts.append(Text(f"  last lines of {st.log_file}:", style="dim"))
            for line in st.log_tail:
                parts.append(Text("    " + line))
    sweep = run.record.get("sweep")
    if sweep:
        parts.append(render_sweep(sweep, states))
    if efficiency is not None:
        from .efficiency import flag_lines

        parts += [Text(line, style="yellow" if line.startswith("!") else "dim") for line in flag_lines(run, efficiency)]
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def render_sweep(record, states):
    """One row per sweep point: its values, state and final metric, best first."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .sweep import rows

    points = rows(record, states)
    metric = next((r["metric"] for r in points if r["metric"]), record.get("metric") or "metric")
    from rich.console import Group

    title = Text(f"sweep: {len(points)} points over {', '.join(record.get('keys', []))} "
                 f"(stages {', '.join(record.get('stages', []))}), best {metric} first")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ["point", *record.get("keys", []), "state", metric]:
        table.add_column(col, no_wrap=True)
    for r in points:
        table.add_row(str(r["index"]), *[str(r["values"].get(k)) for k in record.get("keys", [])],
                      Text(r["state"], style=STATE_STYLE.get(r["state"], "")),
                      f"{r['value']:.4g}" if r["value"] is not None else "-")
    return Group(Text(""), title, table)


def _cut_words(text: str, room: int) -> str:
    """``text`` in at most ``room`` characters, cut between words, with an ellipsis."""
    if len(text) <= room:
        return text
    cut = text[:max(0, room - 1)]
    if " " in cut:
        cut = cut[:cut.rstrip().rfind(" ")].rstrip()
    return cut + "…" if room > 1 else ""


def _short_progress(st) -> str:
    """``45% 12/40 ETA 3m`` without a bar (narrow terminals)."""
    p = st.progress or {}
    if p.get("fraction") is None:
        return "stale" if p.get("stale") else ""
    fraction = 1.0 if st.state == "COMPLETED" else p["fraction"]
    text = f"{fraction * 100:.0f}%"
    if st.state == "RUNNING" and p.get("eta_s") is not None and not p.get("stale"):
        text += f" ETA {_duration(p['eta_s'])}"
    return text + (" STALE" if p.get("stale") else "")


def render_tasks(run, st):
    """``status RUN STAGE``: one row per task of an array stage (or the stage itself). Laid out
    here as one styled text (a rich Table measures every cell: seconds for a 1,000-task array)."""
    from rich.text import Text

    title = f"run {run.id}, stage {st.name}: {st.state}" + (f" ({st.task_counts})" if st.task_list else "")
    header = ("task", "state", "job", "node", "elapsed", "progress", "last metric", "best")
    rows = []
    for t in st.task_list:
        note = t.metric or (_fmt_result(t.result) if t.result and t.state == "COMPLETED" else "") or (t.error[:60] if t.error else "")
        rows.append((str(t.index), t.state, t.job_id or "-", t.node or "-", t.elapsed or "-", progress_cell(t), note,
                     t.best or "-"))
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    out = Text(no_wrap=True, overflow="ignore")
    out.append(title + "\n\n")
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip() + "\n", style="bold")
    out.append("  ".join("─" * w for w in widths) + "\n")
    for row in rows:
        for i, (cell, w) in enumerate(zip(row, widths)):
            if i:
                out.append("  ")
            out.append(cell.ljust(w) if i < len(row) - 1 else cell, style=STATE_STYLE.get(cell, "") if i == 1 else "")
        out.append("\n")
    return out


def _console(file=None):
    from rich.console import Console

    console = Console(file=file, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console = Console(file=file, highlight=False, width=max(console.width, 160), soft_wrap=False)
    return console


def status_text(run, states, width: int = 160, efficiency=None) -> str:
    """The status view as plain text (for tests and pipes)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False).print(
        render_status(run, states, width=width, efficiency=efficiency))
    return buf.getvalue()


def _status_json(run, states) -> Dict[str, Any]:
    from .schema import run_document

    return run_document(run, states)


def _run_exit(states) -> int:
    ok = {"COMPLETED", "SKIPPED"}
    return 0 if all(s.state in ok for s in states.values()) else 1


def watch(run, interval: float = 5.0, as_json: bool = False, max_s: Optional[float] = None) -> int:
    """Refresh the status view every ``interval`` s until the run ends (or Ctrl-C). Reads go
    through the shared poller, so watching costs the scheduler nothing extra."""
    from .status import run_finished, stage_states

    console = _console()
    deadline = time.monotonic() + max_s if max_s else None
    footer = f"refreshing every {interval:g}s; Ctrl-C stops watching (the run goes on)"
    try:
        if console.is_terminal and not as_json:
            from rich.live import Live

            states = stage_states(run)
            with Live(render_status(run, states, footer, console.width), console=console, refresh_per_second=2,
                      auto_refresh=False) as live:
                while not run_finished(states) and not (deadline and time.monotonic() > deadline):
                    time.sleep(interval)
                    states = stage_states(run)
                    live.update(render_status(run, states, footer, console.width), refresh=True)
            return _run_exit(states)
        last = None
        while True:
            states = stage_states(run)
            finished = run_finished(states)
            key = tuple((s.name, s.state, progress_cell(s, unicode=False)[:24], bool(s.hint)) for s in states.values())
            if key != last or finished:
                last = key
                if as_json:
                    print(json.dumps(_status_json(run, states), default=str), flush=True)
                else:
                    from .efficiency import for_run

                    console.print(f"-- {time.strftime('%H:%M:%S')}")
                    console.print(render_status(run, states, width=console.width,
                                                efficiency=for_run(run, states) if finished else None))
            if finished or (deadline and time.monotonic() > deadline):
                return _run_exit(states)
            time.sleep(interval)
    except KeyboardInterrupt:
        print(f"stopped watching; the run goes on ({command()} status {run.id})", file=sys.stderr)
        return 0


def cmd_status(argv: List[str]) -> int:
    from . import poller
    from .ledger import find_run, recent_runs
    from .status import run_job_ids, stage_states

    p = argparse.ArgumentParser(prog=f"{command()} status",
                                description="Stage states, progress and failures of a run.")
    p.add_argument("run", nargs="?", help="run id, run directory or 'last' (default: list recent runs)")
    p.add_argument("stage", nargs="?", help="a stage: list its array tasks (state, job, node, progress, metrics)")
    p.add_argument("--json", action="store_true", help="one JSON object (with --watch: one per change)")
    p.add_argument("--watch", "-w", action="store_true", help="refresh until the run ends (Ctrl-C stops watching)")
    p.add_argument("--interval", type=float, default=5.0, metavar="S", help="--watch refresh interval (default 5 s)")
    args = p.parse_args(argv)
    if args.interval <= 0:
        raise UserError(f"--interval {args.interval}: give a positive number of seconds")
    if not args.run:
        runs = recent_runs(10)
        if not runs and not args.json:
            print(f"no runs yet: {command()} list, then {command()} WORKFLOW")
            return 0
        ids = [i for r in runs for i in run_job_ids(r)]
        from . import slurm

        if ids and slurm.available():
            poller.query(ids)  # ONE scheduler call (at most) for every listed run
        listing = []
        for r in runs:
            counts: Dict[str, int] = {}
            for s in ({} if r.damaged else stage_states(r, triage=False)).values():
                counts[s.state] = counts.get(s.state, 0) + 1
            listing.append((r, counts))
        if args.json:
            from .schema import runs_document

            print(json.dumps(runs_document(listing), indent=2))
            return 0
        _table(["run", "workflow", "cluster", "stages"],
               [(r.id, r.workflow, r.record.get("cluster", ""),
                 "DAMAGED record (run.json unreadable)" if r.damaged else " ".join(f"{k}:{v}" for k, v in counts.items()))
                for r, counts in listing])
        return 0
    run = find_run(args.run)
    if args.stage:
        run.stage(args.stage)  # an unknown stage: one line, exit 2
        st = stage_states(run)[args.stage]
        if args.json:
            from .schema import stage_document

            print(json.dumps(stage_document(run, st), indent=2, default=str))
        else:
            _console().print(render_tasks(run, st))
        return 0
    if args.watch:
        return watch(run, args.interval, as_json=args.json)
    states = stage_states(run)
    if args.json:
        print(json.dumps(_status_json(run, states), indent=2, default=str))
        return 0
    from .efficiency import for_run

    console = _console()
    console.print(render_status(run, states, width=console.width, efficiency=for_run(run, states)))
    return 0


# -- logs ----------------------------------------------------------------------------------------
def _print_text(text: str) -> None:
    sys.stdout.write(text)
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


def _last(lines: List[str], n: Optional[int]) -> List[str]:
    """The last ``n`` lines (all when ``n`` is None, none when it is 0)."""
    if n is None:
        return lines
    return lines[-n:] if n > 0 else []


def _follow_files(files_fn, done_fn, positions: Dict[str, int], poll: float = 0.3) -> int:
    """``tail -f`` over a set of files that may appear later (a pending job, a resubmission):
    new files are printed from their start. Ends when ``done_fn()`` says the stage ended and
    nothing was written for a second, or on Ctrl-C."""
    last_file = None
    quiet_since = time.monotonic()
    next_check = 0.0
    try:
        while True:
            wrote = False
            paths = files_fn()
            for path in paths:
                key = str(path)
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                pos = positions.get(key, 0)
                if size < pos:
                    pos = 0  # truncated or replaced
                if size > pos:
                    with open(path, "rb") as fh:
                        fh.seek(pos)
                        data = fh.read(size - pos)
                    positions[key] = size
                    if len(paths) > 1 and last_file != key:
                        print(f"\n==> {path} <==", flush=True)
                        last_file = key
                    sys.stdout.write(data.decode(errors="replace"))
                    sys.stdout.flush()
                    wrote = True
            now = time.monotonic()
            if wrote:
                quiet_since = now
            if now >= next_check:
                next_check = now + 2.0
                ended = done_fn()
                if ended and now - quiet_since >= 1.0:
                    print(f"[stage ended: {ended}]", flush=True)
                    return 0
            time.sleep(poll)
    except KeyboardInterrupt:
        return 0


def cmd_logs(argv: List[str]) -> int:
    from .ledger import find_run
    from .status import ACTIVE_LIKE, log_attempts, log_files, read_range, stage_states, tail_lines

    p = argparse.ArgumentParser(prog=f"{command()} logs", description="Print or follow a stage's log.")
    p.add_argument("run")
    p.add_argument("stage", nargs="?", help="default: the last stage that started")
    p.add_argument("--task", type=int, help="array task index (default: every task; with --attempt: task 0)")
    p.add_argument("--rank", type=int, default=0, help="which rank's log of a multi-task stage (default 0)")
    p.add_argument("--attempt", type=int, metavar="N",
                   help="only attempt N (1 = the first submission; requeues and resumes count up; -1 = the last)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows, until the stage ends")
    p.add_argument("-n", "--lines", type=int, default=None, metavar="N",
                   help="only the last N lines (0: none, e.g. with -f to see only what comes next)")
    args = p.parse_args(argv)
    if args.lines is not None and args.lines < 0:
        raise UserError(f"-n {args.lines}: give a number of lines, 0 or more")
    run = find_run(args.run)
    stage = args.stage
    if stage is None:
        started = [n for n in run.order if log_files(run, n)]
        if not started:
            raise UserError(f"run {run.id}: no stage has written a log yet")
        stage = started[-1]
    rec = run.stage(stage)
    if args.task is not None and not rec.array:
        raise UserError(f"--task: stage '{stage}' is not an array")
    if args.task is not None and not 0 <= args.task < rec.num_tasks:
        raise UserError(f"--task {args.task}: stage '{stage}' has tasks 0..{rec.num_tasks - 1}")
    slurm_stage = rec.where == "batch" and run.backend == "slurm" and bool(rec.jobs)
    if args.attempt is not None:
        if not slurm_stage:
            raise UserError(f"--attempt: stage '{stage}' ran here, not as a Slurm job; it has one log")
        task = args.task if args.task is not None or not rec.array else 0
        attempts = log_attempts(run, stage, task, args.rank)
        if not attempts:
            raise UserError(f"run {run.id}: stage '{stage}' has no log yet")
        n = args.attempt
        if n == 0 or abs(n) > len(attempts):
            raise UserError(f"--attempt {n}: stage '{stage}' has attempts 1..{len(attempts)}")
        att = attempts[n - 1] if n > 0 else attempts[n]
        print(f"# attempt {att.number}/{len(attempts)} of {stage}: job {att.job_id}, {att.how}")
        for key, rng in att.ranges.items():
            text = read_range(Path(key), rng)
            if not text:
                continue
            print(f"==> {key} <==")
            lines = text.splitlines()
            _print_text("\n".join(_last(lines, args.lines)))
        if args.follow and att.number != len(attempts):
            raise UserError(f"-f follows the newest attempt ({len(attempts)}), not attempt {att.number}")
        if not args.follow:
            return 0
    files = log_files(run, stage, args.task, args.rank)

    def done() -> Optional[str]:
        state = stage_states(run, triage=False)[stage].state
        return None if state in ACTIVE_LIKE or state in ("UNKNOWN", "PLANNED") else state

    positions: Dict[str, int] = {}
    if not files and not args.follow:
        raise UserError(f"run {run.id}: stage '{stage}' has no log yet ({command()} status {run.id}, "
                        f"or logs -f to wait for it)")
    if slurm_stage and args.attempt is None:
        task = args.task if args.task is not None or not rec.array else 0
        attempts = log_attempts(run, stage, task, args.rank)
        if len(attempts) > 1:
            print(f"# {len(attempts)} attempts: " + ", ".join(f"{a.number} (job {a.job_id}, {a.how})" for a in attempts)
                  + "; the files below hold the newest job's; --attempt N shows one")
    if args.attempt is None:
        for path in files:
            if len(files) > 1:
                print(f"==> {path} <==")
            lines = _last(tail_lines(path, args.lines, max_bytes=1 << 30), args.lines) if args.lines is not None else \
                path.read_text(errors="replace").splitlines()
            _print_text("\n".join(lines))
    for path in files:
        try:
            positions[str(path)] = path.stat().st_size
        except OSError:
            pass
    if not args.follow:
        return 0
    if not files:
        print(f"# waiting for stage '{stage}' to write its log ...", flush=True)
    return _follow_files(lambda: log_files(run, stage, args.task, args.rank), done, positions)


# -- debug ---------------------------------------------------------------------------------------
DEBUG_USAGE = """\
usage: python launch.py debug WORKFLOW --stage STAGE [--from-run RUN] [--task I] [--shell] [--break]
                              [--post-mortem] [launch options: --gpus N --cluster C --set KEY=VALUE ...]

Plan WORKFLOW like a launch, then run one stage in the foreground: on Slurm inside `salloc` with the
stage's #SBATCH resources, through the same rendered script body under `srun --pty`, so a
breakpoint() in your code stops at a prompt; locally as a foreground process. The debug run gets
its own run directory (run.json: "debug": true).
"""


def cmd_debug(argv: List[str]) -> int:
    from . import workflow as wfmod
    from .debug import DebugRequest, execute, prepare

    if not argv or argv[0] in ("-h", "--help"):
        print(DEBUG_USAGE.replace("usage: python launch.py", f"usage: {command()}"))
        return 0 if argv else 2
    workflow, rest = argv[0], argv[1:]
    if workflow.startswith("-"):
        raise UserError(f"debug: name the workflow first: {command()} debug WORKFLOW --stage STAGE")
    wf = wfmod.get(workflow)
    parser = launch_parser(workflow, wf.summary, wf.config_keys(), wf.presets)
    parser.prog = f"{command()} debug {workflow}"
    parser.description = f"Run one stage of {workflow} interactively (see {command()} debug --help)."
    parser.add_argument("--stage", required=True, help="the stage to run")
    parser.add_argument("--from-run", metavar="RUN", help="reuse this run's upstream outputs (needed when the stage has inputs)")
    parser.add_argument("--task", type=int, help="array task to run (default 0)")
    parser.add_argument("--shell", action="store_true", help="an interactive shell in the job's environment instead")
    parser.add_argument("--break", dest="brk", action="store_true", help="stop in pdb at the stage function's first line")
    parser.add_argument("--post-mortem", action="store_true", help="open pdb where an exception is raised")
    args = parser.parse_args(rest)
    if args.follow or args.json:
        raise UserError("debug runs in the foreground: --follow and --json do not apply")
    req = _launch_request(workflow, args, rest, ["launch.py", "debug"])
    dreq = DebugRequest(stage=args.stage, from_run=args.from_run, shell=args.shell, break_at_start=args.brk,
                        post_mortem=args.post_mortem, task=args.task, dry_run=args.dry_run)
    dplan = prepare(req, dreq, echo=_echo)
    if args.dry_run:
        if dplan.backend == "slurm":
            print(dplan.script_path.read_text())
            print(" ".join(shlex.quote(a) for a in dplan.salloc))
        else:
            print(" ".join(shlex.quote(a) for a in dplan.inner))
        print(f"dry run: nothing started; debug run directory {dplan.run.dir}")
        return 0
    return execute(dplan, dreq, echo=_echo)


# -- report --------------------------------------------------------------------------------------
def cmd_report(argv: List[str]) -> int:
    from .ledger import find_run
    from .report import collect, write_report

    p = argparse.ArgumentParser(prog=f"{command()} report",
                                description="Write one page about a run: stage table, timings, curves, final metrics.")
    p.add_argument("run")
    p.add_argument("--format", choices=("md", "html"), default="md")
    p.add_argument("--output", "-o", metavar="PATH", help="default: RUN_DIR/report.md (or .html)")
    p.add_argument("--json", action="store_true", help="print the report's data as JSON instead")
    args = p.parse_args(argv)
    run = find_run(args.run)
    if args.json:
        print(json.dumps(collect(run), indent=2, default=str))
        return 0
    path = write_report(run, args.format, Path(args.output) if args.output else None)
    print(path)
    return 0


def cmd_cancel(argv: List[str]) -> int:
    from .ledger import find_run
    from .status import cancel

    p = argparse.ArgumentParser(prog=f"{command()} cancel", description="Cancel a run's jobs (or some stages', or one task's).")
    p.add_argument("run")
    p.add_argument("stages", nargs="*")
    p.add_argument("--task", type=int, metavar="I", help="only task I of the (one) array stage named")
    args = p.parse_args(argv)
    run = find_run(args.run)
    for name in args.stages:
        run.stage(name)
    if args.task is not None and len(args.stages) != 1:
        raise UserError(f"--task needs exactly one stage: {command()} cancel RUN STAGE --task I")
    with run.lock("cancel"):
        ids = cancel(run, args.stages or None, task=args.task)
    print(f"cancelled {len(ids)} job(s) of run {run.id}: {' '.join(ids) or '(none submitted)'}")
    return 0


def cmd_resume(argv: List[str]) -> int:
    from .launch import resume
    from .ledger import find_run

    p = argparse.ArgumentParser(prog=f"{command()} resume",
                                description="Run login steps whose parents completed; else resubmit the stage tasks "
                                            "that did not complete (only those tasks of an array), and what depends on them.")
    p.add_argument("run")
    p.add_argument("--follow", action="store_true", help="stay and show status until the run ends (runs login steps when due)")
    p.add_argument("--json", action="store_true", help="print the run's status as one JSON object instead of a table")
    args = p.parse_args(argv)
    run = find_run(args.run)
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else _echo
    failed = resume(run, echo=echo)
    if run.backend == "slurm":
        from . import poller

        poller.invalidate()
    if args.follow and run.backend == "slurm":
        return _follow(run)
    if args.json:
        from .status import stage_states

        print(json.dumps(_status_json(run, stage_states(run)), indent=2, default=str))
    else:
        cmd_status([run.id])
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        os.environ["HPC_JOBS_COMMAND"] = command()  # jobs' messages name the same command
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(top_help())
            return 0 if argv else 2
        if argv[0] in ("--version", "-V"):
            from . import __version__

            print(f"hpc-jobs {__version__}")
            return 0
        sub, rest = argv[0], argv[1:]
        if sub == "__complete":  # the shell asking for candidates (hpc_jobs/completion.py)
            from .completion import main as complete

            return complete(rest)
        handlers = {"list": cmd_list, "run": cmd_run, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel,
                    "resume": cmd_resume, "profiles": cmd_profiles, "debug": cmd_debug, "report": cmd_report,
                    "new": cmd_new, "completion": cmd_completion}
        if sub in handlers:
            return handlers[sub](rest)
        if sub.startswith("-"):
            raise UserError(f"'{sub}' is an option, but a workflow or command must come first ({command()} list)")
        return cmd_launch(sub, rest)
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
