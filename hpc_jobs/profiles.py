"""Cluster profiles: what differs between clusters, as data.

A profile (YAML in ``templates/profiles/``, or the user's own in ``~/.config/hpc_jobs/profiles/``)
names the backend, the partitions and their limits, how GPUs are requested (``gpu:v100:2`` on
CARC), whether an account is required, the environment lines per kind of stage (``module load``,
``conda activate``), where code, data and runs live, and the signal lead time before a time limit.
``--cluster auto`` picks one from the machine.
"""

from __future__ import annotations

import fnmatch
import getpass
import os
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .errors import UserError
from .spec import parse_time

REPO_ROOT = Path(__file__).resolve().parent.parent


def _templates_dir() -> Path:
    """``templates/``: the package ``hpc_jobs.templates`` (setup.cfg maps the repository's
    top-level ``templates/`` onto it), in an editable install and in a wheel alike; a checkout
    on ``sys.path`` without an install (or an editable install older than that mapping, or a
    run's code snapshot) has it beside ``hpc_jobs/``."""
    from importlib.resources import files

    try:
        return Path(str(files("hpc_jobs.templates")))
    except ModuleNotFoundError:
        return REPO_ROOT / "templates"


#: the sbatch template and the shipped profiles (package data)
TEMPLATES_DIR = _templates_dir()
BUILTIN_DIR = TEMPLATES_DIR / "profiles"


def user_profile_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hpc_jobs" / "profiles"


def hpc_jobs_home() -> Path:
    return Path(os.environ.get("HPC_JOBS_HOME") or (Path.home() / "hpc_jobs"))


@dataclass
class Partition:
    name: str
    max_time: Optional[str] = None  # None: unlimited
    gpus_per_node: int = 0
    gpu_types: List[str] = field(default_factory=list)
    nodes: Optional[int] = None
    cpus_per_node: Optional[int] = None
    mem_per_node: Optional[str] = None  # e.g. "248G": the most a job may ask per node (right-sizing's ceiling)

    @property
    def max_seconds(self) -> Optional[int]:
        return None if self.max_time in (None, "UNLIMITED", "infinite") else parse_time(self.max_time)


@dataclass
class ClusterProfile:
    name: str
    description: str = ""
    backend: str = "slurm"  # "slurm" or "local"
    account: Optional[str] = None  # a default account, or "required", or None
    partitions: Dict[str, Partition] = field(default_factory=dict)
    partitions_from_scheduler: bool = False  # read partitions from scontrol (generic, devcluster)
    default_partition: Dict[str, Optional[str]] = field(default_factory=dict)  # kind -> partition
    gres: str = "gpu:{count}"  # or "gpu:{type}:{count}"
    gpu_type: Optional[str] = None
    signal: str = "USR2"
    signal_lead_s: int = 120
    setup: Dict[str, List[str]] = field(default_factory=dict)  # "common", "cpu", "gpu" -> lines
    env: Dict[str, str] = field(default_factory=dict)
    python: str = "{launch_python}"
    paths: Dict[str, str] = field(default_factory=dict)  # code, data, runs
    max_array_size: Optional[int] = None  # None: ask the scheduler (MaxArraySize)
    submit_rate: float = 20.0  # submissions per second, never burst past it
    #: whether compute nodes reach the internet: a login step in the middle of a pipeline then runs
    #: as a small CPU job; otherwise it waits for the login node (``--follow`` or ``resume RUN``)
    compute_internet: bool = False
    detect: Dict[str, List[str]] = field(default_factory=dict)  # hostname / cluster_name globs
    #: the default container of batch stages (hpc_jobs.container): runtime, image, binds, env, gpus,
    #: python. Without an image it only sets what ``--container IMAGE`` / a stage's container adds to.
    container: Optional[Dict[str, Any]] = None
    source: str = ""

    # -- derived --------------------------------------------------------------------------------
    def expand(self, text: str) -> str:
        """Expand ``$USER``, ``~`` and ``{hpc_jobs_home}`` in a path from the profile."""
        text = text.replace("{hpc_jobs_home}", str(hpc_jobs_home()))
        user = os.environ.get("USER") or getpass.getuser()
        text = text.replace("${USER}", user).replace("$USER", user)
        return os.path.expanduser(os.path.expandvars(text))

    @property
    def runs_root(self) -> Path:
        return Path(self.expand(self.paths.get("runs", "{hpc_jobs_home}/runs")))

    @property
    def data_root(self) -> Path:
        return Path(self.expand(self.paths.get("data", "{hpc_jobs_home}/data")))

    def container_default(self):
        """The ``container`` setting as a :class:`~hpc_jobs.container.Container` (None if unset)."""
        from .container import Container

        if not self.container:
            return None
        container = Container.from_value(self.container, f"profile {self.name}")
        if container.binds:  # $USER and ~ as in paths
            container.binds = tuple(self.expand(b) for b in container.binds)
        if container.image:
            container.image = self.expand(container.image)
        return container

    def python_command(self, launch_python: str) -> str:
        return self.python.replace("{launch_python}", shlex.quote(launch_python))

    def setup_lines(self, kind: str) -> List[str]:
        return list(self.setup.get("common", [])) + list(self.setup.get(kind, []))

    def partition_for(self, kind: str, requested: Optional[str]) -> Optional[str]:
        return requested or self.default_partition.get(kind) or self.default_partition.get("cpu")

    def gres_for(self, count: int, gpu_type: Optional[str]) -> Optional[str]:
        if count <= 0:
            return None
        gpu_type = gpu_type or self.gpu_type
        if gpu_type and "{type}" in self.gres:
            return self.gres.format(type=gpu_type, count=count)
        if gpu_type:
            return f"gpu:{gpu_type}:{count}"
        return self.gres.replace("{type}:", "").format(count=count)


def _from_mapping(data: Mapping[str, Any], source: str) -> ClusterProfile:
    data = dict(data)
    known = set(ClusterProfile.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"profile {source}: unknown keys {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    partitions = {}
    for name, spec in (data.pop("partitions", None) or {}).items():
        partitions[name] = Partition(name=name, **(spec or {}))
    profile = ClusterProfile(partitions=partitions, source=source, **data)
    if profile.backend not in ("slurm", "local"):
        raise UserError(f"profile {source}: backend '{profile.backend}' must be 'slurm' or 'local'")
    if profile.container is not None:
        if not isinstance(profile.container, Mapping):
            raise UserError(f"profile {source}: container must be a mapping (runtime, image, binds, env, gpus, python)")
        profile.container_default().validate(f"profile {source}")
    return profile


def available() -> Dict[str, Path]:
    """Profile name -> file; the user's profiles shadow the built-in ones."""
    found: Dict[str, Path] = {}
    for directory in (BUILTIN_DIR, user_profile_dir()):
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found[path.stem] = path
    return found


def load(name: str) -> ClusterProfile:
    import yaml

    if name == "auto":
        name = detect()
    files = available()
    if name not in files:
        raise UserError(
            f"unknown cluster profile '{name}': use one of {', '.join(sorted(files))} or auto, "
            f"or add {user_profile_dir()}/{name}.yaml"
        )
    with open(files[name]) as fh:
        # libyaml's parser where PyYAML has it: the same safe loading, ~10x faster than pure Python
        data = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    data.setdefault("name", name)
    return _from_mapping(data, str(files[name]))


def _cluster_name() -> Optional[str]:
    if not shutil.which("scontrol"):
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return None


def detect() -> str:
    """Pick a profile for this machine: no sbatch -> local; else match hostname or ClusterName."""
    if os.environ.get("HPC_JOBS_CLUSTER"):
        return os.environ["HPC_JOBS_CLUSTER"]
    if not shutil.which("sbatch"):
        return "local"
    import yaml

    hostname = socket.getfqdn()
    cluster = _cluster_name()
    for name, path in available().items():
        with open(path) as fh:
            rules = (yaml.safe_load(fh) or {}).get("detect") or {}
        if cluster and any(fnmatch.fnmatch(cluster, g) for g in rules.get("cluster_name", [])):
            return name
        if any(fnmatch.fnmatch(hostname, g) for g in rules.get("hostname", [])):
            return name
    return "generic"
