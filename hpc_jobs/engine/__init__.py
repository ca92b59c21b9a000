"""The training engine: one loop (``Trainer``) for every workflow.

``from hpc_jobs.engine import Trainer, TrainConfig, TrainTask, Requeued`` -- torch is imported only
when a torch-bound name is first used, so launchers can build a ``TrainConfig`` without it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from hpc_jobs.engine.config import TrainConfig, resolve_precision
from hpc_jobs.engine.task import TrainTask

_LAZY = {
    "Trainer": "hpc_jobs.engine.trainer",
    "Interrupted": "hpc_jobs.interrupts",
    "Requeued": "hpc_jobs.interrupts",
    "Terminated": "hpc_jobs.interrupts",
    "unwrap": "hpc_jobs.engine.distributed",
    "all_gather_tensor": "hpc_jobs.engine.distributed",
    "load_init_weights": "hpc_jobs.engine.weights",
    "ArchitectureMismatch": "hpc_jobs.engine.weights",
    "deepspeed_config": "hpc_jobs.engine.strategy",
}

__all__ = ["TrainConfig", "TrainTask", "resolve_precision", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
