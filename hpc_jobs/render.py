"""Rendering: (stage, cluster profile, run) -> the exact sbatch script that is submitted.

Two pure steps, so dry-run and tests compare text: :func:`build_job` resolves a stage against a
profile into a :class:`JobScript` (every ``#SBATCH`` value validated, every shell value quoted),
and :func:`render` fills ``templates/sbatch.sh.j2`` with it. Nothing here runs a command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import __version__
from . import container as containermod
from .errors import UserError
from .profiles import TEMPLATES_DIR, ClusterProfile
from .spec import Stage, format_time, parse_mem_mb

TEMPLATE_DIR = TEMPLATES_DIR

# An #SBATCH value is read by sbatch, not by a shell; still, a newline or a quote would let input
# add directives or break parsing, so values are restricted to what Slurm names actually use.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%=+/\-\[\]]+$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_value(what: str, value: object) -> str:
    text = str(value)
    if not SAFE_VALUE.match(text):
        raise UserError(
            f"{what} '{text}' contains characters Slurm does not accept here (spaces, quotes, ';', '$', ...): "
            f"use letters, digits and . , : @ % = + / - [ ] only"
        )
    return text


@dataclass
class Dependency:
    """``afterok`` on whole jobs/arrays, or ``aftercorr`` task by task for array-to-array edges."""

    kind: str  # "afterok" | "aftercorr"
    job_ids: Sequence[str]

    def render(self) -> str:
        return f"{self.kind}:" + ":".join(str(j) for j in self.job_ids)


@dataclass
class JobScript:
    """Everything the template needs, already validated."""

    stage: str
    entry: str
    run_id: str
    job_name: str
    profile: str
    kind: str
    version: str
    script_path: str
    run_dir: str
    code_dir: str
    directives: List[Tuple[str, Optional[str]]]
    setup: List[str]
    env: List[Tuple[str, str]]
    command: str
    array: Optional[str] = None
    dependencies: List[Dependency] = field(default_factory=list)
    #: the stage's resolved container (hpc_jobs.container.Container.to_dict()), None: on the host
    container: Optional[Dict[str, Any]] = None
    prelude: List[str] = field(default_factory=list)  # host lines before the step (a container's bundle)
    epilogue: List[str] = field(default_factory=list)  # host lines after the step (the requeue relay)


#: the module an array task runs (``python -m``) in place of ``submitit.core._submit``: it writes
#: the task's submitit pickle from the stage's ``runner.pkl`` in the job, then hands over to
#: submitit's entry, so submitting an array writes no file per task (hpc_jobs/backends/slurm.py)
ARRAY_ENTRY = "hpc_jobs.backends.slurm"


def submitit_folder(stage_dir: Path) -> Path:
    return stage_dir / "slurm"


def log_paths(stage_dir: Path, array: bool) -> Tuple[str, str]:
    """submitit's own naming (``%j_%t_log.out``), so its job objects find the files too."""
    job = "%A_%a" if array else "%j"
    folder = submitit_folder(stage_dir)
    return str(folder / f"{job}_%t_log.out"), str(folder / f"{job}_%t_log.err")


def array_spec(first: int, last: int, parallelism: Optional[int]) -> str:
    spec = f"{first}-{last}" if last > first else f"{first}"
    if parallelism:
        spec += f"%{parallelism}"
    return spec


def build_job(
    stage: Stage,
    profile: ClusterProfile,
    *,
    workflow: str,
    run_id: str,
    run_dir: Path,
    launch_python: str,
    dependencies: Sequence[Dependency] = (),
    array: Optional[str] = None,
    account: Optional[str] = None,
    chunk: int = 0,
    array_offset: int = 0,
) -> JobScript:
    """Resolve one stage for one profile. ``array`` is the ``--array`` value of chunk ``chunk``,
    whose Slurm index ``a`` runs task ``array_offset + a``."""
    res = stage.resources
    stage_dir = run_dir / "stages" / stage.name
    script_path = stage_dir / ("job.sbatch" if chunk == 0 else f"job.chunk{chunk}.sbatch")
    for path in (run_dir, stage_dir):
        check_value("run directory", path)
    job_name = check_value("job name", f"{workflow}.{stage.name}")
    out, err = log_paths(stage_dir, array is not None)

    directives: List[Tuple[str, Optional[str]]] = [("job-name", job_name), ("comment", f"hpc_jobs:{run_id}")]
    partition = profile.partition_for(stage.setup_kind, res.partition)
    if partition:
        directives.append(("partition", check_value("partition", partition)))
    acct = account or res.account or (profile.account if profile.account != "required" else None)
    if acct:
        directives.append(("account", check_value("account", acct)))
    if res.qos:
        directives.append(("qos", check_value("qos", res.qos)))
    if res.constraint:
        directives.append(("constraint", check_value("constraint", res.constraint)))
    if res.exclude:
        directives.append(("exclude", check_value("exclude", res.exclude)))
    if res.mail_type:
        directives.append(("mail-type", check_value("mail type", res.mail_type.upper())))
    if res.mail_user:
        directives.append(("mail-user", check_value("mail user", res.mail_user)))
    for key, value in res.sbatch:
        directives.append((check_value("sbatch option", key), check_value(f"--sbatch {key}", value) if value != "" else None))
    directives += [
        ("nodes", str(res.nodes)),
        ("ntasks-per-node", str(res.ntasks_per_node)),
        ("cpus-per-task", str(res.cpus_per_task)),
    ]
    gres = profile.gres_for(res.gpus_per_node, res.gpu_type)
    if gres:
        directives.append(("gres", check_value("GPU type", gres)))
    if res.mem:
        directives.append(("mem", f"{parse_mem_mb(res.mem)}M"))
    directives.append(("time", format_time(res.time_seconds)))
    directives.append(("signal", f"{check_value('signal', profile.signal)}@{int(profile.signal_lead_s)}"))
    directives.append(("requeue" if stage.requeue else "no-requeue", None))
    # run in the run directory: `python -m` puts the working directory first on sys.path, and the
    # submit directory (often the checkout) would shadow the run's code snapshot
    directives.append(("chdir", str(run_dir)))
    directives.append(("open-mode", "append"))
    directives.append(("output", out.replace("%t", "0")))
    directives.append(("error", err.replace("%t", "0")))
    if array:
        directives.append(("array", check_value("array", array)))
    if dependencies:
        directives.append(("dependency", ",".join(d.render() for d in dependencies)))
        directives.append(("kill-on-invalid-dep", "yes"))

    python = profile.python_command(launch_python)
    folder = submitit_folder(stage_dir)
    entry = ARRAY_ENTRY if array else "submitit.core._submit"
    srun = ["srun", "--unbuffered", "--output", out, "--error", err]
    container = stage_container(stage, profile)
    prelude: List[str] = []
    epilogue: List[str] = []
    if container is None:
        # ``python`` may be a profile-provided command ("singularity exec ... python"): it is the
        # profile author's shell text, not user input; every other word is quoted.
        command = f"{shlex.join(srun)} {python} -u -m {entry} {shlex.quote(str(folder))}"
    else:
        inner_python = (container.python or "python").replace("{launch_python}", shlex.quote(launch_python))
        inner = containermod.inner_command(container, inner_python, ["-u", "-m", entry, str(folder)])
        step = containermod.wrap_step(
            container, srun, inner, run_dir=str(run_dir), data_root=str(profile.data_root),
            code_dir=str(run_dir / "code"), stage_dir=str(stage_dir), uses_gpus=res.uses_gpus)
        prelude, command, epilogue = step.prelude, step.command, step.epilogue

    env = dict(profile.env)
    env.setdefault("OMP_NUM_THREADS", str(res.cpus_per_task))
    env.setdefault("HPC_JOBS_SIGNAL", profile.signal)  # the runtime ignores it once the stage is done
    env.setdefault("HPC_JOBS_SIGNAL_LEAD_S", str(int(profile.signal_lead_s)))  # RunEnv.stop_cause
    if array:  # for ARRAY_ENTRY: task = offset + Slurm's index; submitit's timeout count
        env["HPC_JOBS_ARRAY_OFFSET"] = str(int(array_offset))
        env["HPC_JOBS_TIMEOUT_MIN"] = str(max(1, res.time_seconds // 60))
    for key in env:
        if not ENV_KEY.match(key):
            raise UserError(f"profile {profile.name}: environment variable name '{key}' is invalid")

    return JobScript(
        stage=stage.name,
        entry=stage.entry,
        run_id=run_id,
        job_name=job_name,
        profile=profile.name,
        kind=stage.setup_kind,
        version=__version__,
        script_path=str(script_path),
        run_dir=str(run_dir),
        code_dir=str(run_dir / "code"),
        directives=directives,
        setup=profile.setup_lines(stage.setup_kind),
        env=sorted(env.items()),
        command=command,
        array=array,
        dependencies=list(dependencies),
        container=container.to_dict() if container else None,
        prelude=prelude,
        epilogue=epilogue,
    )


def stage_container(stage: Stage, profile: ClusterProfile) -> Optional[containermod.Container]:
    """The container a batch stage runs in (stage's over profile's), checked; None: on the host.
    An image path is checked only where jobs are submitted from (sbatch here): a dry run for
    another cluster names that cluster's paths."""
    where = f"stage '{stage.name}'"
    container = containermod.resolve(profile.container_default(), stage.container, None, where)
    if container is not None and shutil.which("sbatch"):
        containermod.check_image(container, where)
    return container


_ENV = None


def _bytecode_cache():
    """The compiled template, kept per user in ``$HPC_JOBS_HOME/cache/templates`` (0700): compiling
    it costs a launch ~30 ms, loading it ~1 ms. Jinja keys each entry on the template's name and
    checks its source's checksum and the Python version, so an edited template is compiled again.
    Without a writable home: no cache (compiled each time)."""
    import jinja2

    from .profiles import hpc_jobs_home

    class _Cache(jinja2.FileSystemBytecodeCache):
        def load_bytecode(self, bucket):
            try:
                super().load_bytecode(bucket)
            except Exception:  # unreadable or damaged: compile from the source
                bucket.reset()

        def dump_bytecode(self, bucket):
            try:
                super().dump_bytecode(bucket)
            except OSError:
                pass

    folder = hpc_jobs_home() / "cache" / "templates"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if folder.stat().st_uid != os.getuid():
            return None  # someone else's folder: never load its bytecode
        os.chmod(folder, 0o700)
    except OSError:
        return None
    return _Cache(str(folder))


def _template():
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            bytecode_cache=_bytecode_cache(),
        )
        _ENV.filters["q"] = lambda v: shlex.quote(str(v))
    return _ENV.get_template("sbatch.sh.j2")


def render(job: JobScript) -> str:
    """The script text. Pure: the same JobScript always gives the same text."""
    return _template().render(job=job)
