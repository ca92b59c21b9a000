"""A real one-host Slurm cluster for development and CI: ``python -m hpc_jobs.devcluster up``.

It emulates two nodes, ``n1`` and ``n2`` (4 CPUs, ~8 GB and 2 fake GPUs each), with accounting
(``sacct``), a preemptible default partition ``batch`` and a high-priority partition ``high``.
Python API::

    from hpc_jobs.devcluster import DevCluster
    DevCluster().up()        # idempotent; installs Debian's Slurm if missing (root only)
    DevCluster().is_up()
    print(DevCluster().status())
    DevCluster().down(purge=False)

Standard library only, so it runs before any virtualenv exists.
"""

from .cluster import (
    ClusterStatus,
    DaemonStatus,
    DevCluster,
    DevClusterError,
    NotSupportedError,
    UpResult,
)
from .config import CLUSTER_NAME, DEFAULT_PARTITION, GPUS_PER_NODE, HIGH_PARTITION, NODES

__all__ = [
    "CLUSTER_NAME",
    "DEFAULT_PARTITION",
    "GPUS_PER_NODE",
    "HIGH_PARTITION",
    "NODES",
    "ClusterStatus",
    "DaemonStatus",
    "DevCluster",
    "DevClusterError",
    "NotSupportedError",
    "UpResult",
]
