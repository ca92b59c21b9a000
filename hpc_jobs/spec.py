"""What to run: resources, stages and pipelines as plain data.

Nothing here knows Slurm or any workflow. A workflow plugin (``launchers/``) builds a
:class:`Pipeline` of :class:`Stage` objects; the renderer turns a stage plus a cluster profile into
an sbatch script; a backend submits it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import UserError

#: Where a stage runs. ``login``: on the login node at launch time, in a subprocess (downloads need
#: the internet, which batch nodes often lack). ``process``: inside the launching process itself
#: (cheap bookkeeping). ``batch``: a Slurm job (or a local subprocess on the local backend).
WHERE = ("login", "process", "batch")

#: How a downstream stage uses an upstream output. ``init``: weights only, loaded non-strictly with
#: key mapping. ``resume``: the same training continued (model, optimizer, scheduler, step, RNG).
#: ``data``: any file or directory (must exist). ``init`` and ``resume`` require a complete
#: checkpoint manifest.
HANDOFF_KINDS = ("init", "resume", "data")

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
MAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+(@[A-Za-z0-9.-]+)?$")
SBATCH_KEY_RE = re.compile(r"^[a-z][a-z0-9-]{1,40}$")
#: sbatch options hpc-jobs writes itself (a pass-through would fight them), and what to use instead
SBATCH_MANAGED = {
    "job-name": "the stage name", "output": "hpc-jobs' log layout", "error": "hpc-jobs' log layout",
    "array": "Stage(array=...)", "dependency": "stage inputs/after", "chdir": "the run directory",
    "time": "--time or --stage-set STAGE.time=...", "partition": "--partition", "account": "--account",
    "nodes": "--nodes", "ntasks-per-node": "--stage-set STAGE.tasks_per_node=...",
    "cpus-per-task": "--cpus-per-task", "mem": "--mem", "gres": "--gpus", "gpus-per-node": "--gpus",
    "qos": "--qos", "constraint": "--constraint", "exclude": "--exclude", "mail-type": "--mail-type",
    "mail-user": "--mail-user", "signal": "the cluster profile's signal", "requeue": "Stage(requeue=...)",
    "no-requeue": "Stage(requeue=False)", "open-mode": "hpc-jobs' log layout", "wrap": "python launch.py run -- CMD",
    "comment": "hpc-jobs' run id", "kill-on-invalid-dep": "hpc-jobs",
}
TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2})(?::(\d{2}))?$|^(\d+)$")
MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)


def parse_time(value: str) -> int:
    """Slurm time string -> seconds. Accepts ``D-HH:MM:SS``, ``HH:MM:SS``, ``HH:MM`` and minutes."""
    text = str(value).strip()
    match = TIME_RE.match(text)
    if not match:
        raise UserError(
            f"time '{value}' is not a Slurm time: use D-HH:MM:SS, HH:MM:SS, HH:MM or minutes (e.g. 02:00:00)"
        )
    if match.group(5) is not None:
        return int(match.group(5)) * 60
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.group(1, 2, 3, 4))
    if match.group(4) is None:  # HH:MM
        return days * 86400 + hours * 3600 + minutes * 60
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def format_time(seconds: int) -> str:
    """Seconds -> ``D-HH:MM:SS`` (or ``HH:MM:SS`` under a day), as sbatch and squeue print it."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    core = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{core}" if days else core


def parse_mem_mb(value: str) -> int:
    """``32G``/``32GB``/``500M``/``4096`` (MB) -> megabytes."""
    match = MEM_RE.match(str(value).strip())
    if not match:
        raise UserError(f"memory '{value}' is not a size: use e.g. 32G, 500M or 4096 (megabytes)")
    number, unit = float(match.group(1)), match.group(2).upper()
    factor = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    return max(1, int(number * factor))


@dataclass(frozen=True)
class Resources:
    """What one stage asks of the scheduler. ``None`` means: the cluster profile's default."""

    nodes: int = 1
    gpus_per_node: int = 0
    gpu_type: Optional[str] = None
    tasks_per_node: Optional[int] = None  # default: one task per GPU, or 1
    cpus_per_task: int = 1
    mem: Optional[str] = "4G"
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None  # nodes to avoid: "n[1-3],gpu12"
    mail_type: Optional[str] = None  # Slurm's own e-mail: "END,FAIL", "ALL", "TIME_LIMIT_80"...
    mail_user: Optional[str] = None
    #: other sbatch options, passed through after validation: (("reservation", "r1"), ("nice", "10"))
    sbatch: Tuple[Tuple[str, str], ...] = ()

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def time_seconds(self) -> int:
        return parse_time(self.time)

    @property
    def uses_gpus(self) -> bool:
        return self.gpus_per_node > 0

    def replace(self, **changes: Any) -> "Resources":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self, where: str) -> None:
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise UserError(f"{where}: {name}={getattr(self, name)} must be at least 1")
        if self.gpus_per_node < 0:
            raise UserError(f"{where}: gpus_per_node={self.gpus_per_node} must be 0 or more")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise UserError(f"{where}: tasks_per_node={self.tasks_per_node} must be at least 1")
        parse_time(self.time)
        if self.mem is not None:
            parse_mem_mb(self.mem)
        if self.mail_type is not None:
            bad = [t for t in self.mail_type.upper().split(",") if t not in MAIL_TYPES]
            if bad or not self.mail_type:
                raise UserError(f"{where}: mail type '{self.mail_type}' is not Slurm's: use a comma list of "
                                f"{', '.join(MAIL_TYPES)}")
        if self.mail_user is not None and not MAIL_RE.match(self.mail_user):
            raise UserError(f"{where}: mail user '{self.mail_user}' is not an e-mail address")
        for key, _value in self.sbatch:
            if key in SBATCH_MANAGED:
                raise UserError(f"{where}: --sbatch {key}=... is set by hpc-jobs; use {SBATCH_MANAGED[key]} instead")
            if not SBATCH_KEY_RE.match(key):
                raise UserError(f"{where}: --sbatch '{key}' is not an sbatch long option name (e.g. reservation, nice)")


@dataclass(frozen=True)
class BestCheckpoint:
    """An output that is the best complete checkpoint of a directory by a validation metric.

    ``outputs={"best": BestCheckpoint("checkpoints", metric="val_corr", mode="max")}``: when a
    downstream stage starts, the input resolves to the complete checkpoint in ``directory`` (of the
    same task, for an array) whose manifest ``metrics[metric]`` is the highest (``max``) or lowest
    (``min``); ties go to the later step. Checkpoints without the metric (a signal-time save) are
    never chosen; none with it fails the downstream stage at start with a clear message.
    """

    directory: str = "checkpoints"
    metric: str = "loss"
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise UserError(f"BestCheckpoint mode '{self.mode}' is unknown: use 'max' or 'min'")

    def to_dict(self) -> Dict[str, str]:
        return {"best_of": self.directory, "metric": self.metric, "mode": self.mode}

    def describe(self) -> str:
        return f"best {self.metric} ({self.mode}) of {self.directory}/"


def output_to_record(value: Any) -> Any:
    """An output declaration as run.json keeps it: a relative path, or a BestCheckpoint dict."""
    return value.to_dict() if isinstance(value, BestCheckpoint) else value


@dataclass(frozen=True)
class Input:
    """A stage's input: output ``output`` of upstream stage ``stage``, used as ``kind``."""

    stage: str
    output: str
    kind: str = "data"
    #: from an array: ``True`` pairs task i with upstream task i (aftercorr; the input is that task's
    #: output); ``False`` waits for the whole upstream array (afterok; the input is the list of every
    #: task's output, in task order).
    per_task: bool = False

    def __post_init__(self) -> None:
        if self.kind not in HANDOFF_KINDS:
            raise UserError(f"input kind '{self.kind}' is unknown: use one of {', '.join(HANDOFF_KINDS)}")


@dataclass
class Stage:
    """One job (or one job array) of a pipeline.

    ``fn`` is an importable function ``fn(ctx) -> dict | None``; ``outputs`` maps output names to
    paths relative to the stage's directory, or of an array task's own directory
    (``stages/<name>/tasks/<i>/``), or to a :class:`BestCheckpoint`.
    """

    name: str
    fn: Callable[..., Any]
    resources: Resources = field(default_factory=Resources)
    where: str = "batch"
    inputs: Dict[str, Input] = field(default_factory=dict)
    outputs: Dict[str, Any] = field(default_factory=dict)  # name -> relative path | BestCheckpoint
    after: Sequence[str] = ()  # ordering-only dependencies (no data handed over)
    array: Optional[int] = None  # number of tasks; None = a plain job
    array_parallelism: Optional[int] = None  # the %K throttle
    kind: Optional[str] = None  # "cpu" or "gpu": which environment setup of the profile; default from GPUs
    description: str = ""
    requeue: bool = True  # allow Slurm to requeue (preemption, signal-driven checkpoint/requeue)
    max_requeues: int = 20  # a stage requeued more often than this fails instead of looping forever
    #: run the stage's tasks in a container (hpc_jobs.container.Container, or a mapping); None: the
    #: profile's ``container`` setting, if any. ``--container IMAGE`` overrides the image.
    container: Any = None

    @property
    def setup_kind(self) -> str:
        if self.kind:
            return self.kind
        return "gpu" if self.resources.uses_gpus else "cpu"

    @property
    def entry(self) -> str:
        """``module:qualname`` of the entry point, for the ledger and for humans."""
        return f"{self.fn.__module__}:{self.fn.__qualname__}"

    @property
    def num_tasks(self) -> int:
        return self.array or 1

    def parents(self) -> List[str]:
        names: List[str] = []
        for name in list(self.after) + [i.stage for i in self.inputs.values()]:
            if name not in names:
                names.append(name)
        return names

    def validate(self) -> None:
        if not NAME_RE.match(self.name):
            raise UserError(
                f"stage name '{self.name}' is invalid: use letters, digits and '_', starting with a letter"
            )
        if self.where not in WHERE:
            raise UserError(f"stage '{self.name}': where='{self.where}' is unknown: use one of {', '.join(WHERE)}")
        if self.array is not None and self.array < 1:
            raise UserError(f"stage '{self.name}': array={self.array} must be at least 1")
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise UserError(f"stage '{self.name}': array_parallelism must be at least 1")
        if self.kind not in (None, "cpu", "gpu"):
            raise UserError(f"stage '{self.name}': kind='{self.kind}' must be 'cpu' or 'gpu'")
        if self.where != "batch" and self.array:
            raise UserError(f"stage '{self.name}': only batch stages can be arrays")
        if not callable(self.fn) or "<locals>" in self.fn.__qualname__ or "<lambda>" in self.fn.__qualname__:
            raise UserError(f"stage '{self.name}': fn must be a module-level function so jobs can import it")
        self.resources.validate(f"stage '{self.name}'")
        if self.container is not None:
            from .container import Container

            self.container = Container.from_value(self.container, f"stage '{self.name}'")
            self.container.validate(f"stage '{self.name}'")
            if self.where != "batch":
                raise UserError(f"stage '{self.name}': a container runs batch stages only (where='{self.where}' "
                                "runs in the launching shell): drop container= or make it where='batch'")
        for name, out in self.outputs.items():
            rel = out.directory if isinstance(out, BestCheckpoint) else out
            if not isinstance(rel, str):
                raise UserError(f"stage '{self.name}': output '{name}' must be a relative path or a BestCheckpoint")
            if rel.startswith("/") or ".." in rel.split("/"):
                raise UserError(f"stage '{self.name}': output '{name}' path '{rel}' must be relative to the stage dir")


class Pipeline:
    """A DAG of stages, in a valid submission order."""

    def __init__(self, workflow: str, stages: Sequence[Stage]):
        self.workflow = workflow
        self.stages: Dict[str, Stage] = {}
        for stage in stages:
            stage.validate()
            if stage.name in self.stages:
                raise UserError(f"pipeline '{workflow}': two stages are named '{stage.name}'")
            self.stages[stage.name] = stage
        self._check_edges()
        self.order: List[str] = self._toposort()

    def __iter__(self):
        return (self.stages[name] for name in self.order)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, name: str) -> Stage:
        return self.stages[name]

    def _check_edges(self) -> None:
        for stage in self.stages.values():
            for parent in stage.parents():
                if parent not in self.stages:
                    raise UserError(
                        f"stage '{stage.name}' depends on '{parent}', which is not a stage of this pipeline "
                        f"(stages: {', '.join(self.stages)})"
                    )
                up = self.stages[parent]
                if stage.where == "process" and up.where == "batch":
                    raise UserError(
                        f"stage '{stage.name}' runs inside the launching process but depends on batch stage "
                        f"'{parent}': make it where='login' (it then runs when its parents have completed) or 'batch'"
                    )
            for name, inp in stage.inputs.items():
                up = self.stages[inp.stage]
                if inp.output not in up.outputs:
                    raise UserError(
                        f"stage '{stage.name}' input '{name}' names output '{inp.output}' of '{inp.stage}', "
                        f"which declares only: {', '.join(up.outputs) or 'no outputs'}"
                    )
                if inp.per_task and (up.num_tasks != stage.num_tasks):
                    raise UserError(
                        f"stage '{stage.name}' input '{name}' is per task, but '{inp.stage}' has "
                        f"{up.num_tasks} tasks and '{stage.name}' has {stage.num_tasks}: they must match"
                    )

    def _toposort(self) -> List[str]:
        order: List[str] = []
        state: Dict[str, int] = {}

        def visit(name: str, path: Tuple[str, ...]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name):] + (name,))
                raise UserError(f"pipeline '{self.workflow}' has a dependency cycle: {cycle}")
            state[name] = 1
            for parent in self.stages[name].parents():
                visit(parent, path + (name,))
            state[name] = 2
            order.append(name)

        for name in self.stages:  # declaration order breaks ties: stages run as written
            visit(name, ())
        return order

    def children(self, name: str) -> List[str]:
        return [s for s in self.order if name in self.stages[s].parents()]

    def descendants(self, names: Sequence[str]) -> List[str]:
        """Stages downstream of any of ``names`` (not including them), in pipeline order."""
        found = set()
        frontier = list(names)
        while frontier:
            current = frontier.pop()
            for child in self.children(current):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
        return [s for s in self.order if s in found]

    def ancestors(self, name: str) -> List[str]:
        """Stages upstream of ``name`` (not including it), in pipeline order."""
        found = set()
        frontier = list(self.stages[name].parents())
        while frontier:
            current = frontier.pop()
            if current not in found:
                found.add(current)
                frontier.extend(self.stages[current].parents())
        return [s for s in self.order if s in found]

    def describe(self) -> List[Mapping[str, Any]]:
        return [
            {
                "name": s.name,
                "entry": s.entry,
                "where": s.where,
                "depends_on": s.parents(),
                "array": s.array,
                "array_parallelism": s.array_parallelism,
                "resources": dataclasses.asdict(s.resources),
                "inputs": {k: dataclasses.asdict(v) for k, v in s.inputs.items()},
                "outputs": {k: output_to_record(v) for k, v in s.outputs.items()},
                "kind": s.setup_kind,
            }
            for s in self
        ]
