"""Backends: how a planned stage becomes a running job.

``slurm``: each batch stage's rendered script is submitted through submitit (one ``sbatch`` per job
or array chunk, dependencies on the parents' job ids). ``local``: the same stages run on this
machine in dependency order. Both run launch-time stages (``login``/``process``) the same way.
"""

from __future__ import annotations


def get_backend(name: str):
    if name == "slurm":
        from .slurm import SlurmBackend

        return SlurmBackend()
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    raise ValueError(f"unknown backend {name}")
