"""Workflow plugins: a launcher object per workflow, registered by name.

A workflow is one file in ``launchers/`` that subclasses :class:`Workflow`, decorates it with
:func:`register`, declares its config dataclass and presets, and builds a pipeline. The core never
imports a workflow by name: it discovers the modules of the ``launchers`` package (shipped), of the
packages, modules or ``.py`` paths named in ``HPC_JOBS_LAUNCHERS``, and the entry points of the
group ``hpc_jobs.workflows`` that installed distributions declare (``NAME = "module:Class"`` or
``NAME = "module"``). Entry points are read from the installed metadata without importing anything;
only the one launched is imported (``list`` imports them all). Workflow modules must not import torch
at module level (launching must feel instant); stage functions import what they need inside their
bodies.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from . import config as cfgmod
from .errors import UserError, command
from .spec import Pipeline

_REGISTRY: Dict[str, Type["Workflow"]] = {}
LAUNCHER_PACKAGES = ("launchers",)
ENTRY_POINT_GROUP = "hpc_jobs.workflows"
SHIPPED = "shipped"
#: workflow name -> where it came from: "shipped", "HPC_JOBS_LAUNCHERS (ENTRY)", "entry point (DIST)"
_SOURCES: Dict[str, str] = {}
_loading: List[str] = ["(imported directly)"]  # the source being imported now (for register's clash error)
#: modules imported for HPC_JOBS_LAUNCHERS entries and entry points: a run snapshots their code
#: (module, whether its whole top-level package is copied)
_EXTRA_CODE: Dict[str, Tuple[ModuleType, bool]] = {}


class WorkflowClashError(UserError, TypeError):
    """Two sources define one workflow name (one line, exit code 2)."""


def launcher_packages() -> List[str]:
    """``launchers`` plus the entries of ``HPC_JOBS_LAUNCHERS`` (comma-separated): packages or
    modules by import name, or paths to a ``.py`` file or a package directory. Keep your own
    workflows in your own package; its code is snapshotted with the run like the rest."""
    extra = [p.strip() for p in os.environ.get("HPC_JOBS_LAUNCHERS", "").split(",") if p.strip()]
    return list(LAUNCHER_PACKAGES) + [p for p in extra if p not in LAUNCHER_PACKAGES]


def _is_path(entry: str) -> bool:
    return "/" in entry or entry.endswith(".py") or entry in (".", "..")


def _import_entry(entry: str) -> ModuleType:
    """Import an ``HPC_JOBS_LAUNCHERS`` entry: a module/package name, or a path to a ``.py`` file
    or a package directory (its parent directory goes on ``sys.path``)."""
    if not _is_path(entry):
        try:
            return importlib.import_module(entry)
        except ModuleNotFoundError as exc:
            if exc.name and entry.split(".")[0] != exc.name.split(".")[0] and not entry.startswith(exc.name + "."):
                raise  # the entry was found; something it imports is missing: the real traceback
            raise UserError(f"HPC_JOBS_LAUNCHERS entry '{entry}': no module named '{exc.name}' (give an importable "
                            f"name, or a path: HPC_JOBS_LAUNCHERS=./{entry.split('.')[-1]}.py)") from None
    path = Path(entry).expanduser().resolve()
    if not path.exists():
        raise UserError(f"HPC_JOBS_LAUNCHERS entry '{entry}': {path} does not exist")
    if path.is_dir() and not (path / "__init__.py").exists():
        raise UserError(f"HPC_JOBS_LAUNCHERS entry '{entry}': {path} is a directory without __init__.py "
                        f"(name a .py file, or a package directory)")
    name = path.stem if path.suffix == ".py" else path.name
    if not name.isidentifier():
        raise UserError(f"HPC_JOBS_LAUNCHERS entry '{entry}': '{name}' is not a Python module name "
                        f"(letters, digits and _ only)")
    parent = str(path.parent)
    if parent not in sys.path:
        sys.path.append(parent)  # last: a file there never shadows an installed module
    module = importlib.import_module(name)
    where = Path(getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")).resolve()
    if where != path and where.parent != path:
        raise UserError(f"HPC_JOBS_LAUNCHERS entry '{entry}': the module name '{name}' is already taken by "
                        f"{where}; rename {path.name}")
    return module


def _import_launchers(entry: str, source: str) -> ModuleType:
    _loading.append(source)
    try:
        module = _import_entry(entry)
        if hasattr(module, "__path__"):  # a package: every public module in it
            for info in pkgutil.iter_modules(module.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{module.__name__}.{info.name}")
    finally:
        _loading.pop()
    return module


def _load_builtin() -> None:
    """The shipped workflows and those of ``HPC_JOBS_LAUNCHERS`` (imported once; cheap after)."""
    _loading.append(SHIPPED)
    try:
        importlib.import_module("hpc_jobs.command")  # the built-in `run`: your own command as a pipeline
    finally:
        _loading.pop()
    for entry in launcher_packages():
        source = SHIPPED if entry in LAUNCHER_PACKAGES else f"HPC_JOBS_LAUNCHERS ({entry})"
        module = _import_launchers(entry, source)
        if source != SHIPPED:
            _EXTRA_CODE[module.__name__] = (module, False)


def _dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?"
    return f"{dist.metadata['Name'] or dist.name} {dist.version}"


#: the last scan of the entry points and what it was read from (see :func:`entry_points`)
_EP_CACHE: Dict[str, Any] = {"key": None, "found": None}


def _path_key() -> Tuple[Any, ...]:
    """What the installed distributions depend on: each ``sys.path`` folder and when its entries
    last changed (installing or removing a distribution adds or removes its ``.dist-info`` there)."""
    key = []
    for entry in sys.path:
        try:
            key.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            key.append((entry, None))
    return tuple(key)


def entry_points() -> Dict[str, List[Any]]:
    """Workflow name -> the entry points of group ``hpc_jobs.workflows`` declaring it (metadata
    only: nothing is imported). One distribution seen twice on ``sys.path`` counts once.

    Reading every distribution's metadata takes ~10 ms; a process that launches again (a notebook,
    a sweep driver, the Python API) reads it again only when ``sys.path`` or one of its folders
    changed since (a distribution installed or removed)."""
    key = _path_key()
    if _EP_CACHE["key"] == key:
        return {name: list(eps) for name, eps in _EP_CACHE["found"].items()}
    from importlib.metadata import entry_points as _eps

    found: Dict[str, List[Any]] = {}
    for ep in _eps(group=ENTRY_POINT_GROUP):
        same = found.setdefault(ep.name, [])
        if not any(o.value == ep.value for o in same):
            same.append(ep)
    _EP_CACHE.update(key=key, found={name: list(eps) for name, eps in found.items()})
    return found


def _ep_source(ep: Any) -> str:
    return f"entry point ({_dist_name(ep)})"


def _check_clash(name: str, eps: List[Any]) -> None:
    """One line naming both sources when two of them define ``name``."""
    if len(eps) > 1:
        a, b = eps[0], eps[1]
        raise WorkflowClashError(
            f"workflow '{name}' is defined twice: {_ep_source(a)}: {a.value} and {_ep_source(b)}: {b.value}; "
            f"uninstall one of them or rename its entry point")
    ep = eps[0]
    cls = _REGISTRY.get(name)
    if cls is not None:
        module = ep.value.split(":")[0].strip()
        if cls.__module__ != module and not cls.__module__.startswith(module + "."):
            raise WorkflowClashError(
                f"workflow '{name}' is defined twice: {_SOURCES.get(name, cls.__module__)}: {cls.__module__} and "
                f"{_ep_source(ep)}: {ep.value}; rename one of them (the entry point's name is the workflow's)")


def _load_entry_point(name: str, ep: Any) -> None:
    source = _ep_source(ep)
    _loading.append(source)
    try:
        obj = ep.load()
    except ImportError as exc:
        raise UserError(f"workflow '{name}' ({source}): cannot import {ep.value}: {exc}") from exc
    finally:
        _loading.pop()
    if isinstance(obj, type) and issubclass(obj, Workflow):
        if obj.name != name:
            raise UserError(f"entry point '{name}' ({source}) names {ep.value}, whose workflow name is "
                            f"'{obj.name}': give the entry point the workflow's name")
        if _REGISTRY.get(name) is not obj:
            _loading.append(source)
            try:
                register(obj)
            finally:
                _loading.pop()
    elif name not in _REGISTRY:
        raise UserError(f"entry point '{name}' ({source}): {ep.value} registers no workflow named '{name}' "
                        f"(point it at a Workflow subclass, module:Class, or at a module that @registers it)")
    _SOURCES.setdefault(name, source)
    module = sys.modules.get(ep.value.split(":")[0].strip())
    if module is not None and module.__name__.split(".")[0] not in LAUNCHER_PACKAGES + ("hpc_jobs",):
        _EXTRA_CODE.setdefault(module.__name__, (module, True))


def source(name: str) -> str:
    """Where workflow ``name`` came from (after :func:`discover` or :func:`get`)."""
    return _SOURCES.get(name, "?")


def launcher_code() -> List[Tuple[str, Path]]:
    """(import name, file or package directory) of the code of every workflow loaded from outside
    the shipped packages, for the run's snapshot: an ``HPC_JOBS_LAUNCHERS`` package or module as
    named; an entry point's whole top-level package (its workflow may import the rest of it)."""
    out: Dict[str, Path] = {}
    for module, whole_top in _EXTRA_CODE.values():
        name = module.__name__.split(".")[0] if whole_top else module.__name__
        top = sys.modules.get(name) or importlib.import_module(name)
        paths = list(getattr(top, "__path__", []) or [])
        if paths:
            out[name] = Path(paths[0])
        elif getattr(top, "__file__", None):
            out[name] = Path(top.__file__)
    return sorted(out.items())


@dataclass
class LaunchOptions:
    """The command-line resources a workflow sizes its stages with."""

    gpus: int = 1
    #: whether ``--gpus`` was given: a workflow whose stages carry their own GPU counts (a paper
    #: preset's) keeps them unless the user asked for a count on the command line
    gpus_given: bool = False
    nodes: int = 1
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    gpu_type: Optional[str] = None
    # the sbatch options people type, for the GPU stages (every batch stage when none uses GPUs)
    mem: Optional[str] = None
    cpus_per_task: Optional[int] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    mail_type: Optional[str] = None
    mail_user: Optional[str] = None
    sbatch: Tuple[Tuple[str, str], ...] = ()  # --sbatch KEY=VALUE, validated pass-through
    stage_sets: Tuple[str, ...] = ()  # --stage-set STAGE.FIELD=VALUE: one stage's resources
    local: bool = False  # the local backend: size stages for this machine
    #: ``--container IMAGE`` / ``--container-runtime``: every batch stage runs in that image
    #: (hpc_jobs.container.apply_cli_container); None: the stage's or the profile's container, if any
    container: Optional[str] = None
    container_runtime: Optional[str] = None

    def __post_init__(self) -> None:
        if self.container or self.container_runtime:  # an unknown runtime: one line, exit 2, at parse time
            from .container import Container

            Container(runtime=self.container_runtime, image=self.container).validate("--container")


class Workflow:
    """Base class of launcher objects. Subclasses set the class attributes and implement build()."""

    name: str = ""
    summary: str = ""
    Config: Type[Any] = None  # a dataclass with defaults for every field
    presets: Mapping[str, Mapping[str, Any]] = {}
    default_preset: Optional[str] = None
    #: the config key naming real data (``root_dir``, ``data.root``...). When it is given (``--set``
    #: or ``--config``), the preset is ``real_data_preset`` (the paper's settings); otherwise
    #: ``default_preset`` (a tiny preset for the generated data set).
    data_key: Optional[str] = None
    real_data_preset: Optional[str] = None
    #: ``--sweep``: the first stage that depends on the swept values (default: the first GPU
    #: stage), and the result key that ranks the points (default: the last stage's first number)
    sweep_from: Optional[str] = None
    sweep_metric: Optional[str] = None
    sweep_mode: str = "max"  # "max": the highest metric ranks first; "min" for errors and losses
    #: import names the stages need that the core does not install (``("torch", "timm")``): a
    #: launch whose jobs run this Python checks them before anything is written or submitted
    requires: Tuple[str, ...] = ()
    #: how to get them, shown when one is missing
    requires_hint: str = "pip install 'hpc-jobs[workflows]'"

    def __init__(self, config: Any, options: LaunchOptions):
        self.config = config
        self.options = options

    def build(self) -> Pipeline:  # pragma: no cover - abstract
        raise NotImplementedError(f"workflow {self.name} must implement build()")

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def make_config(
        cls,
        preset: Optional[str] = None,
        config_file: Optional[str] = None,
        overrides: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        """Defaults <- preset <- YAML file <- ``--set``; each layer type-checked."""
        cfg = cls.Config()
        preset = preset or cls.choose_preset(config_file, overrides or {})
        if preset:
            if preset not in cls.presets:
                raise UserError(
                    f"preset '{preset}' is unknown for workflow '{cls.name}': use one of "
                    f"{', '.join(sorted(cls.presets)) or '(none)'}"
                )
            cfg = cfgmod.apply(cfg, cfgmod.flatten_mapping(cls.presets[preset]), source=f"preset {preset}")
        if config_file:
            cfg = cfgmod.apply(cfg, cfgmod.load_yaml_file(config_file), source=f"--config {config_file}")
        if overrides:
            cfg = cfgmod.apply(cfg, overrides)
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
        return cfg

    @classmethod
    def choose_preset(cls, config_file: Optional[str], overrides: Mapping[str, Any]) -> Optional[str]:
        """The preset used when none is given: ``real_data_preset`` when ``data_key`` is set by
        ``--set`` or the ``--config`` file, else ``default_preset``."""
        if cls.data_key and cls.real_data_preset:
            given = cls.data_key in overrides
            if not given and config_file:
                given = cls.data_key in cfgmod.flatten_mapping(cfgmod.load_yaml_file(config_file))
            if given:
                return cls.real_data_preset
        return cls.default_preset

    @classmethod
    def config_keys(cls) -> List[str]:
        return sorted(cfgmod.leaf_types(cls.Config))

    @classmethod
    def config_help(cls) -> List[str]:
        """``key: type = default`` for every config key (``--help``)."""
        defaults = cfgmod.flatten(cls.Config())
        return [f"{key}: {cfgmod.type_name(tp)} = {defaults.get(key)!r}"
                for key, tp in sorted(cfgmod.leaf_types(cls.Config).items())]

    @classmethod
    def config_sources(cls, preset: Optional[str], config_file: Optional[str],
                       overrides: Optional[Mapping[str, Any]]) -> Dict[str, str]:
        """Where each config key's value comes from: default, preset NAME, --config FILE or --set."""
        sources = {key: "default" for key in cfgmod.leaf_types(cls.Config)}
        preset = preset or cls.choose_preset(config_file, overrides or {})
        if preset in cls.presets:
            sources.update({k: f"preset {preset}" for k in cfgmod.flatten_mapping(cls.presets[preset]) if k in sources})
        if config_file:
            sources.update({k: f"--config {config_file}" for k in cfgmod.load_yaml_file(config_file) if k in sources})
        sources.update({k: "--set" for k in (overrides or {}) if k in sources})
        return sources


def check_requires(cls: Type[Workflow], python: str) -> None:
    """One line naming what ``cls.requires`` lacks in this Python, where its jobs will run
    (``python``) the same interpreter; found without importing (the launch path stays light)."""
    import importlib.util

    missing = [name for name in cls.requires if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"workflow '{cls.name}' needs {', '.join(missing)}, which {python} lacks and its jobs "
                        f"run: {cls.requires_hint} (or set the profile's python/container to an environment "
                        f"that has them)")


def register(cls: Type[Workflow]) -> Type[Workflow]:
    """Class decorator: make a workflow findable as ``python launch.py NAME``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a name")
    if cls.Config is None or not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"workflow {cls.name}: Config must be a dataclass")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__module__ != cls.__module__:
        raise WorkflowClashError(
            f"workflow '{cls.name}' is defined twice: {_SOURCES.get(cls.name, '?')}: {existing.__module__} and "
            f"{_loading[-1]}: {cls.__module__}; rename one of them")
    _REGISTRY[cls.name] = cls
    source = _loading[-1]
    if len(_loading) == 1 and cls.__module__.split(".")[0] in LAUNCHER_PACKAGES + ("hpc_jobs",):
        source = SHIPPED  # a shipped module imported directly (a test, a script)
    _SOURCES.setdefault(cls.name, source)
    return cls


def discover() -> Dict[str, Type[Workflow]]:
    """Every workflow: import the shipped and ``HPC_JOBS_LAUNCHERS`` modules and every entry point
    of ``hpc_jobs.workflows``; return the registry. A name two sources define: one line, exit 2."""
    _load_builtin()
    for name, eps in sorted(entry_points().items()):
        _check_clash(name, eps)
        _load_entry_point(name, eps[0])
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> Type[Workflow]:
    """The workflow ``name``: the shipped and ``HPC_JOBS_LAUNCHERS`` ones are imported; of the entry
    points only the one named ``name`` (the others are read from metadata, never imported)."""
    _load_builtin()
    eps = entry_points()
    if name in eps:
        _check_clash(name, eps[name])
        _load_entry_point(name, eps[name][0])
    if name not in _REGISTRY:
        import difflib

        names = sorted(set(_REGISTRY) | set(eps))
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(
            f"unknown workflow '{name}'.{hint} Available: {', '.join(names)} ({command()} list)"
        )
    return _REGISTRY[name]
