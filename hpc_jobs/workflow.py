"""Workflow plugins: a launcher object per workflow, registered by name.

A workflow is one file in ``launchers/`` that subclasses :class:`Workflow`, decorates it with
:func:`register`, declares its config dataclass and presets, and builds a pipeline. The core never
imports a workflow by name: it discovers the modules of the ``launchers`` package. Workflow modules
must not import torch at module level (launching must feel instant); stage functions import what
they need inside their bodies.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from . import config as cfgmod
from .errors import UserError
from .spec import Pipeline

_REGISTRY: Dict[str, Type["Workflow"]] = {}
LAUNCHER_PACKAGES = ("launchers",)


def launcher_packages() -> List[str]:
    """``launchers`` plus the packages named in ``HPC_JOBS_LAUNCHERS`` (comma-separated): keep your
    own workflows in your own package; its code is snapshotted with the run like the rest."""
    extra = [p.strip() for p in os.environ.get("HPC_JOBS_LAUNCHERS", "").split(",") if p.strip()]
    return list(LAUNCHER_PACKAGES) + [p for p in extra if p not in LAUNCHER_PACKAGES]


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


def register(cls: Type[Workflow]) -> Type[Workflow]:
    """Class decorator: make a workflow findable as ``python launch.py NAME``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a name")
    if cls.Config is None or not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"workflow {cls.name}: Config must be a dataclass")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__module__ != cls.__module__:
        raise TypeError(f"workflow name '{cls.name}' is registered twice ({existing.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> Dict[str, Type[Workflow]]:
    """Import every module of the launcher packages once; return the registry."""
    importlib.import_module("hpc_jobs.command")  # the built-in `run`: your own command as a pipeline
    for package_name in launcher_packages():
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> Type[Workflow]:
    workflows = discover()
    if name not in workflows:
        import difflib

        close = difflib.get_close_matches(name, list(workflows), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(
            f"unknown workflow '{name}'.{hint} Available: {', '.join(workflows)} (python launch.py list)"
        )
    return workflows[name]
