"""Backends: how selected stage tasks become running jobs. One interface, two implementations.

``backend.start(run, selection, echo, active=None) -> not_done``: run or submit the selected stage
tasks (``selection``: stage -> task indices, ``[None]`` for a plain job, in pipeline order), each
after its parents; ``active``: parents still queued or running from an earlier submission (their
Slurm job ids) to depend on. A launch selects every task, a resume what did not complete.

``slurm``: each stage's rendered script is submitted through submitit (one ``sbatch`` per job or
array chunk, dependencies on the parents' job ids); returns at once. ``local``: the same stages
run on this machine in order (an array's tasks side by side as the CPUs allow); returns the tasks that did not complete. Launch-time stages
(``login``/``process``) always run through the local backend.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol


class Backend(Protocol):
    name: str

    def start(self, run: Any, selection: Dict[str, List[Optional[int]]], echo: Callable[[str], None],
              active: Optional[Dict[str, List[str]]] = None) -> Dict[str, set]: ...


def get_backend(name: str) -> Backend:
    if name == "slurm":
        from .slurm import SlurmBackend

        return SlurmBackend()
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    raise ValueError(f"unknown backend {name}")
