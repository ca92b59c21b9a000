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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import config as cfgmod
from . import profiles as profmod
from . import render as rendermod
from . import workflow as wfmod
from .errors import PreflightError, SubmitError, UserError
from .ledger import Run, new_run_id
from .profiles import ClusterProfile
from .runtime import StageRunner, write_runner
from .spec import Pipeline, Stage

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


# -- planning ------------------------------------------------------------------------------------
def make_plan(req: LaunchRequest) -> Plan:
    wf_cls = wfmod.get(req.workflow)
    profile = profmod.load(req.cluster)
    opts = dataclasses.replace(req.options, local=(profile.backend == "local"))
    if opts.gpus < 0 or opts.nodes < 1:
        raise UserError(f"--gpus {opts.gpus} / --nodes {opts.nodes}: GPUs must be 0 or more and nodes at least 1")
    preset = req.preset or wf_cls.choose_preset(req.config_file, req.overrides or {})
    config = wf_cls.make_config(preset, req.config_file, req.overrides)
    pipeline = wf_cls(config, opts).build()
    apply_cli_resources(pipeline, opts)
    run_id = new_run_id(req.run_name)
    run_dir = profile.runs_root / wf_cls.name / run_id
    return Plan(wf_cls, config, profile, pipeline, run_id, run_dir, sys.executable, opts.account, preset)


def apply_cli_resources(pipeline: Pipeline, opts: wfmod.LaunchOptions) -> None:
    """``--partition``/``--time``/``--gpu-type`` size the GPU stages (every batch stage when none uses GPUs)."""
    batch = [s for s in pipeline if s.where == "batch"]
    targets = [s for s in batch if s.resources.uses_gpus] or batch
    for stage in targets:
        stage.resources = stage.resources.replace(partition=opts.partition, time=opts.time, gpu_type=opts.gpu_type)
        stage.resources.validate(f"stage '{stage.name}'")


def chunks(n_tasks: int, max_array: int) -> List[range]:
    """Task index ranges of the array chunks (Slurm array indices must stay below MaxArraySize)."""
    size = max(1, max_array - 1) if max_array > 1 else 1
    return [range(start, min(n_tasks, start + size)) for start in range(0, n_tasks, size)]


def job_for(plan: Plan, stage: Stage, deps: Sequence[rendermod.Dependency], chunk: int, tasks: Optional[range]):
    array = None
    if stage.array is not None and tasks is not None:
        array = rendermod.array_spec(0, len(tasks) - 1, stage.array_parallelism)
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
    max_array = _max_array(plan.profile)
    out: Dict[str, List[rendermod.JobScript]] = {}
    for stage in plan.pipeline:
        if stage.where != "batch":
            continue
        parents = [p for p in stage.parents() if plan.pipeline[p].where == "batch"]
        deps = [rendermod.Dependency("afterok", [f"<{p}>" for p in parents])] if parents else []
        task_chunks = chunks(stage.num_tasks, max_array) if stage.array else [None]
        out[stage.name] = [job_for(plan, stage, deps, i, c) for i, c in enumerate(task_chunks)]
    return out


# -- preflight -----------------------------------------------------------------------------------
def preflight(plan: Plan, jobs: Dict[str, List[rendermod.JobScript]], test_only: bool) -> None:
    """Check the plan against the profile and the scheduler. Raise PreflightError (exit 2)."""
    profile = plan.profile
    if profile.backend == "local":
        return
    if profile.account == "required" and not plan.account:
        raise PreflightError(
            f"cluster '{profile.name}' requires an account: add --account <your project> "
            f"(CARC: see 'myaccount' for your project names)"
        )
    partitions = _partition_limits(profile)
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
    if test_only:
        _test_only(plan, jobs)


def _partition_limits(profile: ClusterProfile) -> Dict[str, Dict[str, Any]]:
    if profile.partitions_from_scheduler:
        from . import slurm

        if not slurm.available():
            raise PreflightError(
                f"cluster profile '{profile.name}' reads partitions from Slurm, but there is no sbatch here: "
                f"run on the cluster's login node, or start the dev cluster (python -m hpc_jobs.devcluster up)"
            )
        return {
            name: {"max_time_s": p.max_time_s, "gpus_per_node": p.gpus_per_node, "gpu_types": [], "nodes": p.nodes}
            for name, p in slurm.scheduler_partitions().items()
        }
    return {
        name: {"max_time_s": p.max_seconds, "gpus_per_node": p.gpus_per_node if p.gpus_per_node else None,
               "gpu_types": p.gpu_types, "nodes": p.nodes}
        for name, p in profile.partitions.items()
    }


def _test_only(plan: Plan, jobs: Dict[str, List[rendermod.JobScript]]) -> None:
    """``sbatch --test-only`` every script (without dependencies: the parents don't exist yet)."""
    from concurrent.futures import ThreadPoolExecutor

    from . import slurm

    scripts = []
    for name, chunk_jobs in jobs.items():
        job = dataclasses.replace(chunk_jobs[0], directives=[d for d in chunk_jobs[0].directives
                                                             if d[0] not in ("dependency", "kill-on-invalid-dep")])
        scripts.append((name, rendermod.render(job)))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda item: (item[0], slurm.test_only(item[1])), scripts))
    for name, error in results:
        if error:
            raise PreflightError(f"stage '{name}': Slurm would reject the job: {error}")


# -- recording -----------------------------------------------------------------------------------
def _runner(plan: Plan, stage: Stage) -> StageRunner:
    return StageRunner(
        run_dir=str(plan.run_dir),
        stage=stage.name,
        fn=stage.fn,
        config=plan.config,
        inputs=dict(stage.inputs),
        outputs=dict(stage.outputs),
        upstream_tasks={p: plan.pipeline[p].num_tasks for p in stage.parents()},
        data_root=str(plan.profile.data_root),
        task_index=None,
        num_tasks=stage.num_tasks,
        max_requeues=stage.max_requeues,
    )


def record_run(plan: Plan, req: LaunchRequest, jobs: Dict[str, List[rendermod.JobScript]]) -> Run:
    import yaml

    runs_root = plan.profile.runs_root
    if req.dry_run and not _creatable(runs_root):
        # a dry run for another cluster (/scratch1 does not exist here): keep the files locally;
        # the scripts still name the cluster's paths
        runs_root = profmod.hpc_jobs_home() / "dry-runs"
    run = Run.create(runs_root, plan.workflow.name, plan.run_id)
    run.write_provenance(
        req.argv or [sys.argv[0], req.workflow],
        yaml.safe_dump(cfgmod.to_dict(plan.config), sort_keys=False),
        yaml.safe_dump(dataclasses.asdict(plan.profile), sort_keys=False),
    )
    run.snapshot_code()
    stages: Dict[str, Any] = {}
    for desc, stage in zip(plan.pipeline.describe(), plan.pipeline):
        stage_dir = run.stage_dir(stage.name)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_runner(stage_dir, _runner(plan, stage))
        entry = dict(desc)
        entry.update(state="PLANNED", jobs=[], attempts=0)
        if stage.name in jobs:
            entry["script"] = jobs[stage.name][0].script_path
            entry["job_templates"] = [dataclasses.asdict(j) for j in jobs[stage.name]]
        stages[stage.name] = entry
    run.record.update(
        backend=plan.profile.backend,
        cluster=plan.profile.name,
        data_root=str(plan.profile.data_root),
        submit_rate=plan.profile.submit_rate,
        options=dataclasses.asdict(req.options),
        preset=plan.preset,
        order=list(plan.pipeline.order),
        stages=stages,
        slurm_version=_slurm_version(plan.profile),
    )
    run.save()
    return run


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


# -- running -------------------------------------------------------------------------------------
def run_stage_here(run: Run, name: str, echo: Echo, gpus_note: Callable[[int], None] = lambda n: None) -> int:
    """Run one stage on this machine (launch-time stages everywhere; all stages locally)."""
    from .backends.local import LocalBackend

    entry = run.stage(name)
    res = entry["resources"]
    ranks_per_node = res["tasks_per_node"] or max(1, res["gpus_per_node"])
    world = res["nodes"] * ranks_per_node
    if world > 1:
        gpus_note(world)
    backend = LocalBackend()
    tasks = list(range(entry["array"])) if entry.get("array") else [None]
    prefix = f"[{name}] "
    threads = max(1, (os.cpu_count() or 1) // max(1, world))
    for task in tasks:
        tag = prefix if task is None else f"[{name}:{task}] "
        code = backend.run_task(run.dir, name, task, world, ranks_per_node,
                                echo=lambda line, t=tag: echo(t + line), threads_per_rank=threads)
        if code != 0:
            return code
    return 0


def _set_state(run: Run, name: str, state: str, **extra: Any) -> None:
    run.record["stages"][name].update(state=state, **extra)
    run.save()


def run_launch_time_stages(run: Run, names: Sequence[str], echo: Echo) -> List[str]:
    """Run ``login``/``process`` stages now; return the names that failed."""
    failed: List[str] = []
    for name in names:
        entry = run.stage(name)
        if entry["where"] == "batch":
            continue
        if any(p in failed for p in entry["depends_on"]):
            _set_state(run, name, "CANCELLED", reason="upstream stage failed")
            failed.append(name)
            continue
        _set_state(run, name, "RUNNING", started=time.time())
        code = run_stage_here(run, name, echo)
        _set_state(run, name, "COMPLETED" if code == 0 else "FAILED", ended=time.time(), exit_code=code)
        if code != 0:
            failed.append(name)
    return failed


def dependencies_for(run: Run, name: str, rerun: Sequence[str], chunk: int) -> List[rendermod.Dependency]:
    """Slurm dependencies of one chunk: on the parents being (re)submitted in this launch."""
    entry = run.stage(name)
    whole: List[str] = []
    corr: List[str] = []
    for parent in entry["depends_on"]:
        p = run.stage(parent)
        if p["where"] != "batch" or parent not in rerun:
            continue  # done already (launch-time, or completed in an earlier attempt)
        per_task = any(i["stage"] == parent and i["per_task"] for i in entry["inputs"].values())
        ids = [j["job_id"] for j in p["jobs"]]
        if per_task and len(ids) > chunk:
            corr.append(ids[chunk])
        else:
            whole.extend(ids)
    deps = []
    if whole:
        deps.append(rendermod.Dependency("afterok", whole))
    if corr:
        deps.append(rendermod.Dependency("aftercorr", corr))
    return deps


def submit_batch_stages(run: Run, names: Sequence[str], echo: Echo) -> None:
    """Submit ``names`` (in order) to Slurm, each depending on its resubmitted parents."""
    import pickle

    from .backends.slurm import SlurmBackend
    from .fsutil import atomic_write_text

    backend = SlurmBackend()
    backend.configure(float(run.record.get("submit_rate") or 0))
    for name in names:
        entry = run.stage(name)
        if entry["where"] != "batch":
            continue
        with open(run.stage_dir(name) / "runner.pkl", "rb") as fh:
            runner: StageRunner = pickle.load(fh)
        jobs = []
        offset = 0
        for chunk, template in enumerate(entry["job_templates"]):
            deps = dependencies_for(run, name, names, chunk)
            directives = [tuple(d) for d in template["directives"] if d[0] not in ("dependency", "kill-on-invalid-dep")]
            if deps:
                directives += [("dependency", ",".join(d.render() for d in deps)), ("kill-on-invalid-dep", "yes")]
            job = rendermod.JobScript(**{**template, "directives": directives, "dependencies": deps})
            text = rendermod.render(job)
            atomic_write_text(job.script_path, text, mode=0o700, fsync=False)  # rebuilt from run.json
            folder = rendermod.submitit_folder(run.stage_dir(name))
            res = entry["resources"]
            n_tasks = res["nodes"] * (res["tasks_per_node"] or max(1, res["gpus_per_node"]))
            timeout_min = max(1, int(_time_s(res["time"]) // 60))
            try:
                if entry.get("array"):
                    size = _array_len(job.array)
                    runners = [runner.for_task(offset + i) for i in range(size)]
                    offset += size
                    job_id = backend.submit(folder, text, runners, n_tasks, timeout_min, array=True)
                    jobs.append({"job_id": job_id, "array": job.array, "first_task": offset - size, "script": job.script_path})
                else:
                    job_id = backend.submit(folder, text, [runner], n_tasks, timeout_min, array=False)
                    jobs.append({"job_id": job_id, "script": job.script_path})
            except SubmitError as exc:
                _submit_failed(run, name, jobs, exc)
        entry["jobs"] = jobs
        entry["attempts"] = int(entry.get("attempts", 0)) + 1
        entry["state"] = "SUBMITTED"
        entry.setdefault("history", []).append({"submitted": time.time(), "job_ids": [j["job_id"] for j in jobs]})
        run.save(durable=False)  # the job ids are on disk before the next submission
    run.save()
    from . import poller

    poller.invalidate()  # status asks the scheduler again soon, whoever asks


def _submit_failed(run: Run, name: str, jobs: List[Dict[str, Any]], exc: Exception) -> None:
    """sbatch refused ``name``: keep what was submitted on disk, then one line saying what to do."""
    submitted = [n for n in run.record.get("order", []) if n != name and run.stage(n).get("state") == "SUBMITTED"]
    if jobs:  # an array split in chunks: the chunks already queued belong to the ledger too
        run.stage(name)["jobs"] = jobs
        run.stage(name)["state"] = "SUBMITTED"
    run.save()
    kept = f"stages already queued keep running ({', '.join(submitted)}); " if submitted else "nothing was queued; "
    raise SubmitError(f"sbatch refused stage '{name}': {exc}. {kept}fix the cause, then "
                      f"`python launch.py resume {run.id}` submits the rest") from exc


def _time_s(text: str) -> int:
    from .spec import parse_time

    return parse_time(text)


def _array_len(spec: str) -> int:
    rng = spec.split("%")[0]
    if "-" in rng:
        lo, hi = rng.split("-")
        return int(hi) - int(lo) + 1
    return 1


def run_batch_stages_locally(run: Run, names: Sequence[str], echo: Echo) -> List[str]:
    """The local backend: run stages in order; a failure cancels its descendants."""
    failed: List[str] = []
    said = []

    def gpus_note(world: int) -> None:
        if said:
            return
        said.append(True)
        if not _has_cuda():
            echo(f"no GPU on this machine: {world} ranks run with gloo on the CPU")

    for name in names:
        entry = run.stage(name)
        if entry["where"] != "batch":
            continue
        blocked = [p for p in entry["depends_on"] if p in failed]
        if blocked:
            _set_state(run, name, "CANCELLED", reason=f"upstream stage {blocked[0]} did not complete")
            failed.append(name)
            echo(f"[{name}] cancelled: upstream stage '{blocked[0]}' did not complete")
            continue
        _set_state(run, name, "RUNNING", started=time.time())
        code = run_stage_here(run, name, echo, gpus_note)
        entry = run.stage(name)
        entry["attempts"] = int(entry.get("attempts", 0)) + 1
        _set_state(run, name, "COMPLETED" if code == 0 else "FAILED", ended=time.time(), exit_code=code)
        if code != 0:
            failed.append(name)
            echo(f"[{name}] FAILED (exit code {code}); logs: {run.stage_dir(name) / 'local'}")
    return failed


def _has_cuda() -> bool:
    """Cheap check without importing torch: a visible NVIDIA device node."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


@dataclass
class LaunchResult:
    run: Optional[Run]
    plan: Plan
    scripts: Dict[str, List[str]]
    failed: List[str] = field(default_factory=list)


def launch(req: LaunchRequest, echo: Echo = print) -> LaunchResult:
    plan = make_plan(req)
    jobs = preview_jobs(plan)
    slurm_real = plan.profile.backend == "slurm" and not req.dry_run
    preflight(plan, jobs, test_only=slurm_real)
    run = record_run(plan, req, jobs)
    if req.dry_run:
        scripts = write_scripts(jobs)
        run.record["dry_run"] = True
        run.save()
        return LaunchResult(run, plan, scripts)
    scripts = {}  # written by the submission, with the real dependencies
    run.remember()
    with run.lock("launch"):
        order = run.record["order"]
        failed = run_launch_time_stages(run, order, echo)
        batch = [n for n in order if run.stage(n)["where"] == "batch"]
        if failed:
            for name in plan.pipeline.descendants(failed):
                if run.stage(name)["state"] == "PLANNED":
                    _set_state(run, name, "CANCELLED", reason="upstream launch-time stage failed")
            return LaunchResult(run, plan, scripts, failed)
        if plan.profile.backend == "slurm":
            submit_batch_stages(run, batch, echo)
        else:
            failed = run_batch_stages_locally(run, batch, echo)
    return LaunchResult(run, plan, scripts, failed)


def resume(run: Run, echo: Echo = print) -> List[str]:
    """Resubmit the stages that did not complete, and their descendants; reuse completed outputs."""
    from .status import stage_states

    with run.lock("resume"):
        run.reload()
        states = stage_states(run)
        active = [n for n, s in states.items() if s.state in ("PENDING", "RUNNING", "REQUEUED", "PREEMPTED", "SUBMITTED")]
        if active:
            raise UserError(
                f"run {run.id}: stage(s) {', '.join(active)} still queued or running: wait, or "
                f"python launch.py cancel {run.id} first"
            )
        order = run.record["order"]
        not_done = [n for n in order if states[n].state != "COMPLETED"]
        if not not_done:
            echo(f"run {run.id}: every stage completed; nothing to resume")
            return []
        pipeline_children = _children_map(run)
        rerun = set(not_done)
        frontier = list(not_done)
        while frontier:
            for child in pipeline_children.get(frontier.pop(), []):
                if child not in rerun:
                    rerun.add(child)
                    frontier.append(child)
        names = [n for n in order if n in rerun]
        for name in names:
            _archive_markers(run, name)
            _set_state(run, name, "PLANNED")
        echo(f"resuming {', '.join(names)}; reusing completed {', '.join(n for n in order if n not in rerun) or '(none)'}")
        failed = run_launch_time_stages(run, names, echo)
        if failed:
            return failed
        batch = [n for n in names if run.stage(n)["where"] == "batch"]
        if run.record.get("backend") == "slurm":
            submit_batch_stages(run, batch, echo)
            return []
        return run_batch_stages_locally(run, batch, echo)


def _children_map(run: Run) -> Dict[str, List[str]]:
    children: Dict[str, List[str]] = {}
    for name in run.record["order"]:
        for parent in run.stage(name)["depends_on"]:
            children.setdefault(parent, []).append(name)
    return children


def _archive_markers(run: Run, name: str) -> None:
    stage_dir = run.stage_dir(name)
    for marker in stage_dir.glob("state*.json"):
        os.replace(marker, marker.with_name(marker.name + ".prev"))
