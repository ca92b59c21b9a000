"""From a command line to submitted jobs: plan, preflight, record, submit. And ``resume``.

The flow (docs/architecture.md draws it): the workflow builds a Pipeline from its config and the
launch options; every batch stage is rendered for the cluster profile (``render.build_job``);
preflight checks the whole plan against the profile and the scheduler and fails with one line
before anything exists on disk; the run directory records everything; launch-time stages run
here; batch stages are submitted in dependency order (Slurm) or run in order (local).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import config as cfgmod
from . import profiles as profmod
from . import render as rendermod
from . import workflow as wfmod
from .errors import PreflightError, UserError, command
from .ledger import Run, last_snapshot, new_run_id, note_snapshot
from .profiles import ClusterProfile
from .record import StageRecord, array_directive, compress_indices, task_chunks
from .runtime import StageRunner, write_runner
from .spec import Pipeline, Stage, parse_mem_mb
from . import states as statesmod

Echo = Callable[[str], None]


@dataclass
class LaunchRequest:
    workflow: str
    cluster: str = "auto"
    options: wfmod.LaunchOptions = field(default_factory=wfmod.LaunchOptions)
    preset: Optional[str] = None
    config_file: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    run_name: Optional[str] = None
    dry_run: bool = False
    argv: List[str] = field(default_factory=list)
    sweep: List[str] = field(default_factory=list)  # --sweep KEY=V1,V2 (hpc_jobs/sweep.py)
    sweep_from: Optional[str] = None
    sweep_parallel: Optional[int] = None
    right_size: bool = False  # --right-size: mem/time/cpus from earlier runs (hpc_jobs/efficiency.py)
    resources_from: Optional[str] = None  # --resources-from RUN: from that run
    #: the workflow's class when the caller looked it up already (the CLI does, for its --help):
    #: make_plan then skips a second lookup (it reads every installed package's entry points)
    workflow_class: Optional[type] = field(default=None, repr=False, compare=False)


@dataclass
class RightSizing:
    """What --right-size / --resources-from changed, and from which runs."""

    runs: List[str]
    changes: List[Any]  # efficiency.Change
    notes: List[str]

    def lines(self, workflow: str) -> List[str]:
        head = (f"right-sizing from {len(self.runs)} earlier run(s) of {workflow}: {', '.join(self.runs)}"
                if self.runs else f"right-sizing: no earlier run of {workflow} with this preset on this cluster: "
                                  f"resources unchanged")
        return [head, *("  " + c.line() for c in self.changes), *("  " + n for n in self.notes)]

    def to_record(self) -> Dict[str, Any]:
        return {"runs": self.runs, "changes": [dataclasses.asdict(c) for c in self.changes], "notes": self.notes}


@dataclass
class Plan:
    """Everything decided before anything is written or submitted."""

    workflow: type
    config: Any
    profile: ClusterProfile
    pipeline: Pipeline
    run_id: str
    run_dir: Path
    launch_python: str
    account: Optional[str]
    preset: Optional[str] = None  # the preset applied (given, or chosen by the workflow)
    sweep: Optional[Any] = None  # hpc_jobs.sweep.Sweep
    point_configs: List[Any] = field(default_factory=list)  # the config of each sweep point
    right_sized: Optional[RightSizing] = None
    _max_array: Optional[int] = field(default=None, repr=False)

    @property
    def max_array(self) -> int:
        """The largest array one sbatch takes (the scheduler's MaxArraySize, asked once per plan)."""
        if self._max_array is None:
            self._max_array = _max_array(self.profile)
        return self._max_array


# -- planning ------------------------------------------------------------------------------------
def make_plan(req: LaunchRequest) -> Plan:
    wf_cls = req.workflow_class if getattr(req.workflow_class, "name", None) == req.workflow else wfmod.get(req.workflow)
    profile = profmod.load(req.cluster)
    opts = dataclasses.replace(req.options, local=(profile.backend == "local"))
    if opts.gpus < 0 or opts.nodes < 1:
        raise UserError(f"--gpus {opts.gpus} / --nodes {opts.nodes}: GPUs must be 0 or more and nodes at least 1")
    preset = req.preset or wf_cls.choose_preset(req.config_file, req.overrides or {})
    config = wf_cls.make_config(preset, req.config_file, req.overrides)
    pipeline = wf_cls(config, opts).build()
    apply_cli_resources(pipeline, opts)
    right_sized = right_size(req, wf_cls.name, preset, profile, pipeline, opts)
    from . import sweep as sweepmod
    from .container import apply_cli_container

    apply_cli_container(pipeline, opts)  # --container IMAGE: every batch stage runs in that image
    if ("{launch_python}" in profile.python and not (profile.container or {}).get("image")
            and all(stage.container is None for stage in pipeline)):
        wfmod.check_requires(wf_cls, sys.executable)  # the jobs run this Python: it must have what they import
    place_login_steps(pipeline, profile)

    sweep = sweepmod.parse(req.sweep)
    point_configs: List[Any] = []
    if sweep is not None:
        sweepmod.check_keys(sweep, wf_cls.config_keys())
        point_configs = [wf_cls.make_config(preset, req.config_file, {**req.overrides, **point}) for point in sweep.points]
        start_stage = sweepmod.first_swept_stage(pipeline, req.sweep_from, wf_cls.sweep_from)
        sweepmod.apply(pipeline, sweep, start_stage, req.sweep_parallel)
        sweep.metric, sweep.mode = wf_cls.sweep_metric, wf_cls.sweep_mode
        pipeline = Pipeline(pipeline.workflow, list(pipeline))  # validate the arrays and per-task edges again
    run_id = new_run_id(req.run_name)
    run_dir = profile.runs_root / wf_cls.name / run_id
    return Plan(wf_cls, config, profile, pipeline, run_id, run_dir, sys.executable, opts.account, preset,
                sweep, point_configs, right_sized)


def right_size(req: LaunchRequest, workflow: str, preset: Optional[str], profile: ClusterProfile,
               pipeline: Pipeline, opts: wfmod.LaunchOptions) -> Optional[RightSizing]:
    """``--right-size`` / ``--resources-from RUN``: each batch stage's mem, time and CPUs from
    earlier runs (hpc_jobs/efficiency.py), within the partition's limits. A value given on the
    command line (--mem, --time, --cpus-per-task, --stage-set STAGE.FIELD=...) is kept."""
    if not req.right_size and not req.resources_from:
        return None
    if req.right_size and req.resources_from:
        raise UserError("--right-size and --resources-from RUN: give one (--right-size looks at the newest runs itself)")
    if profile.backend != "slurm":
        raise UserError(f"--right-size/--resources-from: cluster '{profile.name}' is not a Slurm cluster; "
                        f"there is no accounting to size from")
    from . import efficiency
    from .ledger import find_run

    if req.resources_from:
        source = find_run(req.resources_from)
        if source.workflow != workflow:
            raise UserError(f"--resources-from {req.resources_from}: run {source.id} is a {source.workflow} run, "
                            f"not {workflow}")
        if source.backend != "slurm":
            raise UserError(f"--resources-from {req.resources_from}: run {source.id} ran on the {source.backend} "
                            f"backend; only a Slurm run has accounting to size from")
        history = [source]
    else:
        history = efficiency.earlier_runs(profile.runs_root, workflow, preset, profile.name)
    limits = _partition_limits(profile)

    def limits_for(stage: Stage) -> efficiency.Limits:
        part = profile.partition_for(stage.setup_kind, stage.resources.partition) or ""
        lim = limits.get(part, {})
        return efficiency.Limits(part, lim.get("mem_mb"), lim.get("max_time_s"), lim.get("cpus_per_node"))

    pinned = {f: getattr(opts, f) is not None for f in ("mem", "time", "cpus_per_task")}
    for item in opts.stage_sets:
        target = item.partition("=")[0].replace("-", "_")
        pinned[target] = True
    changes, notes = efficiency.right_size(pipeline, history, limits_for,
                                           keep=lambda stage, f: pinned.get(f, False) or pinned.get(f"{stage}.{f}", False))
    return RightSizing([r.id for r in history], changes, notes)


def apply_cli_resources(pipeline: Pipeline, opts: wfmod.LaunchOptions) -> None:
    """``--partition``/``--time``/``--gpu-type`` size the GPU stages (every batch stage when none
    uses GPUs); an explicit ``--gpus N`` bounds every GPU stage at N GPUs per node, whatever a
    preset asked for it."""
    batch = [s for s in pipeline if s.where == "batch"]
    targets = [s for s in batch if s.resources.uses_gpus] or batch
    for stage in targets:
        res = stage.resources.replace(partition=opts.partition, time=opts.time, gpu_type=opts.gpu_type, mem=opts.mem,
                                      cpus_per_task=opts.cpus_per_task, qos=opts.qos, constraint=opts.constraint,
                                      exclude=opts.exclude, mail_type=opts.mail_type, mail_user=opts.mail_user)
        if opts.sbatch:
            res = dataclasses.replace(res, sbatch=tuple(res.sbatch) + tuple(opts.sbatch))
        if opts.gpus_given and res.gpus_per_node > opts.gpus >= 1:
            tasks = res.tasks_per_node
            res = dataclasses.replace(res, gpus_per_node=opts.gpus,
                                      tasks_per_node=opts.gpus if tasks == res.gpus_per_node else tasks)
        stage.resources = res
        stage.resources.validate(f"stage '{stage.name}'")
    for item in opts.stage_sets:
        apply_stage_set(pipeline, item)


#: what --stage-set may change, with its type
STAGE_FIELDS = {"nodes": int, "gpus_per_node": int, "tasks_per_node": int, "cpus_per_task": int, "mem": str,
                "time": str, "partition": str, "qos": str, "constraint": str, "exclude": str, "gpu_type": str,
                "mail_type": str, "mail_user": str}


def apply_stage_set(pipeline: Pipeline, item: str) -> None:
    """``--stage-set train.mem=64G``: one stage's resources, validated like the rest."""
    target, eq, value = item.partition("=")
    stage_name, dot, field_name = target.partition(".")
    if not eq or not dot or not value:
        raise UserError(f"--stage-set '{item}' is not STAGE.FIELD=VALUE (e.g. --stage-set train.mem=64G)")
    if stage_name not in pipeline.stages:
        raise UserError(f"--stage-set '{item}': no stage '{stage_name}' (stages: {', '.join(pipeline.order)})")
    kind = STAGE_FIELDS.get(field_name.replace("-", "_"))
    if kind is None:
        raise UserError(f"--stage-set '{item}': '{field_name}' is not a resource; use one of {', '.join(STAGE_FIELDS)}")
    try:
        typed = kind(value)
    except ValueError:
        raise UserError(f"--stage-set '{item}': '{value}' is not a whole number") from None
    stage = pipeline[stage_name]
    stage.resources = dataclasses.replace(stage.resources, **{field_name.replace("-", "_"): typed})
    stage.resources.validate(f"--stage-set {stage_name}")


def place_login_steps(pipeline: Pipeline, profile: ClusterProfile) -> None:
    """A login step after batch stages (a download of what a batch stage selected) runs as a small
    CPU job where compute nodes reach the internet (and on the local backend, in order); elsewhere
    it stays a login step that waits for its parents."""
    if profile.backend == "slurm" and not profile.compute_internet:
        return
    for stage in pipeline:
        if stage.where == "login" and any(pipeline[a].where == "batch" for a in pipeline.ancestors(stage.name)):
            stage.where = "batch"
            stage.kind = stage.kind or "cpu"


def job_for(plan: Plan, stage: Stage, deps: Sequence[rendermod.Dependency], chunk: int,
            tasks: Optional[Tuple[int, List[int]]]):
    array = None
    if stage.array is not None and tasks is not None:
        array = array_directive(tasks[1], tasks[0], stage.array_parallelism)
    return rendermod.build_job(
        stage,
        plan.profile,
        workflow=plan.workflow.name,
        run_id=plan.run_id,
        run_dir=plan.run_dir,
        launch_python=plan.launch_python,
        dependencies=deps,
        array=array,
        account=plan.account,
        chunk=chunk,
        array_offset=tasks[0] if array else 0,
    )


def _max_array(profile: ClusterProfile) -> int:
    if profile.max_array_size:
        return int(profile.max_array_size)
    if profile.backend == "slurm":
        from . import slurm

        if slurm.available():
            return slurm.max_array_size()
    return 1001


def preview_jobs(plan: Plan) -> Dict[str, List[rendermod.JobScript]]:
    """Render every batch stage with symbolic dependencies (for --dry-run and preflight)."""
    max_array = plan.max_array
    out: Dict[str, List[rendermod.JobScript]] = {}
    for stage in plan.pipeline:
        if stage.where != "batch":
            continue
        parents = [p for p in stage.parents() if plan.pipeline[p].where == "batch"]
        # as the submission will: task i after task i of a per-task parent array, else the whole job
        per_task = {i.stage for i in stage.inputs.values() if i.per_task and stage.array and plan.pipeline[i.stage].array}
        whole = [f"<{p}>" for p in parents if p not in per_task]
        corr = [f"<{p}>" for p in parents if p in per_task]
        deps = ([rendermod.Dependency("afterok", whole)] if whole else []) + \
               ([rendermod.Dependency("aftercorr", corr)] if corr else [])
        parts = task_chunks(range(stage.num_tasks), max_array) if stage.array else [None]
        out[stage.name] = [job_for(plan, stage, deps, i, c) for i, c in enumerate(parts)]
    return out


# -- preflight -----------------------------------------------------------------------------------
def preflight(plan: Plan, jobs: Dict[str, List[rendermod.JobScript]], test_only: bool,
              facts: Optional["_Prefetch"] = None) -> None:
    """Check the plan against the profile and the scheduler. Raise PreflightError (exit 2)."""
    start_preflight(plan, jobs, test_only, facts)()


def _nothing_to_wait_for() -> None:
    return None


def start_preflight(plan: Plan, jobs: Dict[str, List[rendermod.JobScript]], test_only: bool,
                    facts: Optional["_Prefetch"] = None) -> Callable[[], None]:
    """Check the plan against the profile and the scheduler's partitions now (PreflightError,
    exit 2) and start ``sbatch --test-only`` of every script; returns the function that waits for
    Slurm's answers and raises PreflightError for a script it would reject. The launch records the
    run while Slurm answers, and removes it again if it does (nothing is submitted before)."""
    profile = plan.profile
    if profile.backend == "local":
        return _nothing_to_wait_for
    if profile.account == "required" and not plan.account:
        raise PreflightError(
            f"cluster '{profile.name}' requires an account: add --account <your project> "
            f"(CARC: see 'myaccount' for your project names)"
        )
    # sbatch --test-only (read-only) runs while the partitions are read and checked; a partition
    # error is still the one reported when both fail
    tested = _test_only(plan, jobs) if test_only else None
    try:
        _check_partitions(plan, facts)
    except BaseException:
        if tested is not None:
            tested()  # no sbatch left running behind the error
        raise

    def wait() -> None:
        for name, error in tested() if tested is not None else []:
            if error:
                raise PreflightError(f"stage '{name}': Slurm would reject the job: {error}")
    return wait


def _check_partitions(plan: Plan, facts: Optional["_Prefetch"] = None) -> None:
    profile = plan.profile
    partitions = _partition_limits(profile, facts)
    for stage in plan.pipeline:
        if stage.where != "batch":
            continue
        res = stage.resources
        part = profile.partition_for(stage.setup_kind, res.partition)
        if not part:
            raise PreflightError(f"stage '{stage.name}': no partition given and profile '{profile.name}' has no default: use --partition")
        if part not in partitions:
            raise PreflightError(
                f"stage '{stage.name}': partition '{part}' does not exist on '{profile.name}': "
                f"use one of {', '.join(sorted(partitions))}"
            )
        limit = partitions[part]
        if limit["max_time_s"] is not None and res.time_seconds > limit["max_time_s"]:
            from .spec import format_time

            raise PreflightError(
                f"stage '{stage.name}': time {res.time} is above partition '{part}''s limit "
                f"{format_time(limit['max_time_s'])}: lower --time or choose another partition"
            )
        if res.gpus_per_node > 0 and limit["gpus_per_node"] is not None and res.gpus_per_node > limit["gpus_per_node"]:
            raise PreflightError(
                f"stage '{stage.name}': {res.gpus_per_node} GPUs per node asked, but partition '{part}' nodes "
                f"have {limit['gpus_per_node']}: use --gpus {max(limit['gpus_per_node'], 1)} or more --nodes"
            )
        gpu_type = res.gpu_type or profile.gpu_type
        if res.gpus_per_node and gpu_type and limit["gpu_types"] and gpu_type not in limit["gpu_types"]:
            raise PreflightError(
                f"stage '{stage.name}': GPU type '{gpu_type}' is not in partition '{part}' "
                f"({', '.join(limit['gpu_types'])}): use --gpu-type"
            )
        if limit["nodes"] and res.nodes > limit["nodes"]:
            raise PreflightError(
                f"stage '{stage.name}': {res.nodes} nodes asked, partition '{part}' has {limit['nodes']}: lower --nodes"
            )


def _partition_limits(profile: ClusterProfile, facts: Optional["_Prefetch"] = None) -> Dict[str, Dict[str, Any]]:
    """Each partition's limits; ``facts``: the scheduler's partitions asked for already."""
    def scheduler_partitions():
        from . import slurm

        return facts.partitions.result() if facts is not None and facts.partitions else slurm.scheduler_partitions()

    if profile.partitions_from_scheduler:
        from . import slurm

        if not slurm.available():
            raise PreflightError(
                f"cluster profile '{profile.name}' reads partitions from Slurm, but there is no sbatch here: "
                f"run on the cluster's login node, or start the dev cluster (python -m hpc_jobs.devcluster up)"
            )
        return {
            name: {"max_time_s": p.max_time_s, "gpus_per_node": p.gpus_per_node, "gpu_types": [], "nodes": p.nodes,
                   "mem_mb": p.mem_mb, "cpus_per_node": p.cpus_per_node}
            for name, p in scheduler_partitions().items()
        }
    limits = {
        name: {"max_time_s": p.max_seconds, "gpus_per_node": p.gpus_per_node if p.gpus_per_node else None,
               "gpu_types": p.gpu_types, "nodes": p.nodes, "cpus_per_node": p.cpus_per_node,
               "mem_mb": parse_mem_mb(p.mem_per_node) if p.mem_per_node else None}
        for name, p in profile.partitions.items()
    }
    from . import slurm

    if profile.backend == "slurm" and slurm.available():
        # on the cluster itself: what the partition's nodes really have (sinfo) wins over the profile
        try:
            real = scheduler_partitions()
        except UserError:
            real = {}
        for name, part in real.items():
            if name in limits:
                limits[name]["gpus_per_node"] = part.gpus_per_node
                limits[name]["mem_mb"] = part.mem_mb or limits[name]["mem_mb"]
                limits[name]["cpus_per_node"] = part.cpus_per_node or limits[name]["cpus_per_node"]
    return limits


def _test_only(plan: Plan, jobs: Dict[str, List[rendermod.JobScript]]):
    """Start ``sbatch --test-only`` of every script (without dependencies: the parents don't exist
    yet), four at a time in threads; returns a function that waits for ``[(stage, error or None)]``."""
    from concurrent.futures import ThreadPoolExecutor

    from . import slurm

    scripts = []
    for name, chunk_jobs in jobs.items():
        job = dataclasses.replace(chunk_jobs[0], directives=[d for d in chunk_jobs[0].directives
                                                             if d[0] not in ("dependency", "kill-on-invalid-dep")])
        scripts.append((name, rendermod.render(job)))
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hpc-jobs-test-only")
    tests = [pool.submit(slurm.test_only, text) for _, text in scripts]
    pool.shutdown(wait=False)
    return lambda: [(name, test.result()) for (name, _), test in zip(scripts, tests)]


# -- recording -----------------------------------------------------------------------------------
def _runner(plan: Plan, stage: Stage) -> StageRunner:
    pipeline = plan.pipeline
    return StageRunner(
        run_dir=str(plan.run_dir),
        stage=stage.name,
        fn=stage.fn,
        config=plan.config,
        inputs=dict(stage.inputs),
        outputs=dict(stage.outputs),
        upstream={p: {"array": pipeline[p].array, "outputs": dict(pipeline[p].outputs)} for p in stage.parents()},
        data_root=str(plan.profile.data_root),
        task_index=None,
        num_tasks=stage.num_tasks,
        max_requeues=stage.max_requeues,
        point_configs=list(plan.point_configs) if plan.sweep and stage.name in plan.sweep.stages else None,
    )


def record_run(plan: Plan, req: LaunchRequest, jobs: Dict[str, List[rendermod.JobScript]],
               facts: Optional["_Prefetch"] = None) -> Run:
    import yaml

    run = Run.create(_runs_root(plan, req), plan.workflow.name, plan.run_id)
    # libyaml's dumper where PyYAML has it (the same YAML, ~10x faster than the pure-Python one)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    run.write_provenance(
        req.argv or [sys.argv[0], req.workflow],
        yaml.dump(cfgmod.to_dict(plan.config), Dumper=dumper, sort_keys=False),
        yaml.dump(dataclasses.asdict(plan.profile), Dumper=dumper, sort_keys=False),
        git=facts.git.result() if facts else None,
    )
    run.snapshot_code(prepared=facts.code_copy() if facts else None,
                      previous=last_snapshot(_runs_root(plan, req)))
    for desc, stage in zip(plan.pipeline.describe(), plan.pipeline):
        stage_dir = run.stage_dir(stage.name)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_runner(stage_dir, _runner(plan, stage))
        rec = StageRecord.from_dict(dict(desc))
        if stage.name in jobs:
            rec.script = jobs[stage.name][0].script_path
            rec.job_templates = [dataclasses.asdict(j) for j in jobs[stage.name]]
        run.stages[stage.name] = rec
    run.record.update(
        backend=plan.profile.backend,
        cluster=plan.profile.name,
        data_root=str(plan.profile.data_root),
        submit_rate=plan.profile.submit_rate,
        max_array_size=plan.max_array if plan.profile.backend == "slurm" and not req.dry_run else None,
        options=dataclasses.asdict(req.options),
        preset=plan.preset,
        order=list(plan.pipeline.order),
        slurm_version=facts.version.result() if facts and facts.version else _slurm_version(plan.profile),
        sweep=plan.sweep.to_record() if plan.sweep else None,
        right_sized=plan.right_sized.to_record() if plan.right_sized else None,
    )
    # a Slurm launch saves it again, durably, with the job ids; until then nothing depends on it
    run.save(durable=not (plan.profile.backend == "slurm" and not req.dry_run))
    return run


def _runs_root(plan: Plan, req: LaunchRequest) -> Path:
    runs_root = plan.profile.runs_root
    if req.dry_run and not _creatable(runs_root):
        # a dry run for another cluster (/scratch1 does not exist here): keep the files locally;
        # the scripts still name the cluster's paths
        runs_root = profmod.hpc_jobs_home() / "dry-runs"
    return runs_root


def _creatable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def _slurm_version(profile: ClusterProfile) -> Optional[str]:
    if profile.backend != "slurm":
        return None
    from . import slurm

    return slurm.version()


def write_scripts(jobs: Dict[str, List[rendermod.JobScript]]) -> Dict[str, List[str]]:
    from .fsutil import atomic_write_text

    texts: Dict[str, List[str]] = {}
    for name, chunk_jobs in jobs.items():
        texts[name] = []
        for job in chunk_jobs:
            text = rendermod.render(job)
            atomic_write_text(job.script_path, text, mode=0o700, fsync=False)
            texts[name].append(text)
    return texts


# -- what to run -----------------------------------------------------------------------------------
#: the tasks of some stages: stage -> task indices (``[None]`` for a plain job), in pipeline order
Selection = Dict[str, List[Optional[int]]]


def whole(run: Run, names: Sequence[str]) -> Selection:
    return {n: run.stage(n).task_indices for n in run.order if n in names}


# -- starting a selection: launch, resume, and a login step whose parents are done -----------------
def start(run: Run, selection: Selection, echo: Echo, active: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """Run or submit the selected stage tasks in order; return the stages that failed here.

    Launch-time stages run here first. On Slurm, a login step with a batch ancestor that is being
    submitted now or still runs waits (WAITING_LOGIN) with everything below it, and the rest is
    submitted; ``advance_login_steps`` runs it later. Locally everything runs in order."""
    active = active or {}
    order = [n for n in run.order if n in selection]
    slurm = run.backend == "slurm"

    def waits(name: str) -> bool:
        return any(run.stage(a).where == "batch" and (a in selection or a in active) for a in run.ancestors(name))

    from .backends import get_backend
    from .backends.local import LocalBackend

    here_first = [n for n in order if run.stage(n).where != "batch" and not (slurm and waits(n))]
    not_done = LocalBackend().start(run, {n: selection[n] for n in here_first}, echo)
    if not_done:
        for name in run.descendants(list(not_done)):
            if name in selection and run.stage(name).state in statesmod.PLANNED:
                run.set_state(name, "CANCELLED", reason="an upstream launch-time stage failed")
        return list(not_done)
    rest = [n for n in order if n not in here_first]
    waiting = [n for n in rest if run.stage(n).where != "batch"]  # login steps after batch stages (Slurm)
    blocked = set(waiting) | set(run.descendants(waiting))
    for name in waiting:
        run.set_state(name, "WAITING_LOGIN",
                      reason=f"runs on the login node once its parents complete: {command()} resume {run.id}")
    for name in rest:
        if name in blocked and name not in waiting:
            run.set_state(name, "PLANNED", reason="after the login step " + ", ".join(
                w for w in waiting if w in run.ancestors(name)))
    backend = get_backend(run.backend)
    return list(backend.start(run, {n: selection[n] for n in rest if n not in blocked}, echo, active))


def advance_login_steps(run: Run, echo: Echo) -> List[str]:
    """Run every waiting login step whose batch ancestors have completed, then submit what waited
    for it. Returns the login steps that ran (empty when none was ready)."""
    from .status import stage_states

    states = stage_states(run, triage=False, fresh=True)
    ready = [n for n in run.order if run.stage(n).state == "WAITING_LOGIN"
             and all(states[a].state == "COMPLETED" for a in run.ancestors(n) if run.stage(a).where == "batch")]
    if not ready:
        return []
    below = [d for d in run.descendants(ready) if run.stage(d).state in statesmod.PLANNED]
    active = {n: st.job_ids for n, st in states.items() if st.state in statesmod.ACTIVE and st.job_ids}
    echo(f"run {run.id}: login step(s) {', '.join(ready)} ready: running here, then submitting {', '.join(below) or 'nothing'}")
    start(run, whole(run, ready + below), echo, active)
    return ready


@dataclass
class LaunchResult:
    run: Optional[Run]
    plan: Plan
    scripts: Dict[str, List[str]]
    failed: List[str] = field(default_factory=list)


class _Prefetch:
    """What the launch will need and may ask for early, in threads, while it plans and checks:
    the read-only facts (git HEAD and diff, the Slurm version, MaxArraySize and the partitions,
    asked as soon as sbatch is here), and the code snapshot, copied into a hidden directory next
    to where the run will be and moved into it once preflight passed (removed when it does not:
    a failed launch leaves nothing). Each is work the launch would otherwise wait for in turn;
    a failure reads as before (the same exception, where the value is used)."""

    def __init__(self, req: LaunchRequest) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from .ledger import git_state

        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hpc-jobs-prefetch")
        self.git = self._pool.submit(git_state)
        self.version = self.max_array = self.partitions = self.code = None
        self._code_dir: Optional[Path] = None
        from . import slurm

        if req.cluster != "local" and slurm.available():  # the scheduler's facts, speculatively
            self.max_array = self._pool.submit(slurm.max_array_size)
            self.partitions = self._pool.submit(slurm.scheduler_partitions)

    def planned(self, plan: Plan, req: LaunchRequest) -> None:
        self._start_snapshot(plan, req)  # the longest of them: first
        if plan.profile.backend == "slurm":
            self.version = self._pool.submit(_slurm_version, plan.profile)
            if self.max_array is not None and not plan.profile.max_array_size:
                plan._max_array = self.max_array.result()
        else:
            self.partitions = None  # a local run asks nothing of Slurm

    def _start_snapshot(self, plan: Plan, req: LaunchRequest) -> None:
        import tempfile

        from .ledger import snapshot_code

        # next to where the run will be, in a folder that exists already (a launch that fails
        # creates none); none yet (a first launch): record_run copies it after preflight
        root = plan.profile.runs_root
        candidates = [root / plan.workflow.name, root]
        if req.dry_run:
            candidates += [profmod.hpc_jobs_home() / "dry-runs" / plan.workflow.name, profmod.hpc_jobs_home() / "dry-runs"]
        parent = next((c for c in candidates if c.is_dir() and os.access(c, os.W_OK)), None)
        if parent is None:
            return
        try:
            self._code_dir = Path(tempfile.mkdtemp(prefix=f".{plan.run_id}.code-", dir=parent))
        except OSError:
            return
        self.code = self._pool.submit(snapshot_code, self._code_dir / "code", last_snapshot(_runs_root(plan, req)))

    def code_copy(self) -> Optional[Path]:
        """The snapshot, complete (None: record_run copies it itself)."""
        if self.code is None:
            return None
        return self.code.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._code_dir is not None:
            if self.code is not None:
                try:
                    self.code.result()  # never remove a copy still being written
                except Exception:  # noqa: BLE001  (raised where it is used)
                    pass
            import shutil

            shutil.rmtree(self._code_dir, ignore_errors=True)  # empty once moved into the run


def launch(req: LaunchRequest, echo: Echo = print) -> LaunchResult:
    facts = _Prefetch(req)
    try:
        plan = make_plan(req)
        facts.planned(plan, req)
        jobs = preview_jobs(plan)
        slurm_real = plan.profile.backend == "slurm" and not req.dry_run
        slurm_answers = start_preflight(plan, jobs, test_only=slurm_real, facts=facts)
        try:
            run = record_run(plan, req, jobs, facts)  # while Slurm checks the scripts
        except BaseException:
            slurm_answers()  # a script Slurm would reject is the error to report
            raise
        try:
            slurm_answers()
        except BaseException:
            _remove_unsubmitted(run.dir)
            raise
        note_snapshot(run.dir.parent.parent, run.code_dir)  # <runs root>/<workflow>/<run>: the next launch links from it
    finally:
        facts.close()
    if req.dry_run:
        scripts = write_scripts(jobs)
        run.record["dry_run"] = True
        run.save()
        return LaunchResult(run, plan, scripts)
    run.remember()
    with run.lock("launch"):
        failed = start(run, whole(run, run.order), echo)
    return LaunchResult(run, plan, {}, failed)


def _remove_unsubmitted(run_dir: Path) -> None:
    """A launch that preflight stopped after its run was recorded leaves no run behind (the folders
    above it stay: another launch may be creating its run in them)."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


def rerun_selection(run: Run, states: Dict[str, Any]) -> Selection:
    """The stage tasks that did not complete, plus what depends on them: a per-task dependent
    only for those tasks, any other dependent whole."""
    selection: Dict[str, set] = {}
    for name in run.order:
        rec = run.stage(name)
        st = states[name]
        if rec.array:
            tasks = {t.index for t in st.task_list if t.state not in statesmod.DONE}
            tasks |= {t for t in range(rec.num_tasks) if t not in {x.index for x in st.task_list}}
        else:
            tasks = set() if st.state in statesmod.DONE else {None}
        per_task = set(rec.per_task_parents())
        for parent in rec.depends_on:
            if parent in selection:
                if parent in per_task and rec.array and run.stage(parent).array:
                    tasks |= selection[parent]
                else:
                    tasks = set(rec.task_indices)
        if tasks:
            selection[name] = tasks
    return {n: sorted(t, key=lambda x: -1 if x is None else x) for n, t in selection.items()}


def resume(run: Run, echo: Echo = print) -> List[str]:
    """Run login steps that are ready; else resubmit the stage tasks that did not complete and
    their dependents; completed tasks' outputs are reused as they are."""
    from .status import stage_states

    with run.lock("resume"):
        run.reload()
        if run.backend == "slurm" and any(r.state == "WAITING_LOGIN" for r in run.stages.values()):
            if advance_login_steps(run, echo):
                return []
        states = stage_states(run, triage=False, fresh=True)  # a decision: the scheduler's answer, now
        active = [n for n, s in states.items() if s.state in statesmod.ACTIVE]
        if active:
            waiting = [n for n in run.order if run.stage(n).state == "WAITING_LOGIN"]
            then = f"; login step(s) {', '.join(waiting)} run when it completes (resume again then, or status --watch)" if waiting else ""
            raise UserError(
                f"run {run.id}: stage(s) {', '.join(active)} still queued or running: wait, or "
                f"{command()} cancel {run.id} first{then}"
            )
        selection = rerun_selection(run, states)
        if not selection:
            echo(f"run {run.id}: every stage completed; nothing to resume")
            return []
        for name, tasks in selection.items():
            _archive_markers(run, name, tasks)
            rec = run.stage(name)
            for task in tasks:
                rec.task_state.pop(str(task), None)
            rec.state, rec.reason = "PLANNED", ""
        run.save()
        what = ", ".join(n + (f"[{compress_indices([t for t in ts if t is not None])}]" if run.stage(n).array else "")
                         for n, ts in selection.items())
        reused = ", ".join(n for n in run.order if n not in selection) or "(none)"
        echo(f"resuming {what}; reusing completed {reused}")
        return start(run, selection, echo)


def _archive_markers(run: Run, name: str, tasks: Sequence[Optional[int]]) -> None:
    from .runtime import marker_path

    for task in tasks:
        marker = marker_path(run.stage_dir(name), task)
        if marker.exists():
            os.replace(marker, marker.with_name(marker.name + ".prev"))
