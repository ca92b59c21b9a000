"""hpc-jobs: Slurm-native job framework for ML research pipelines.

The public API a workflow plugin uses: :class:`Workflow` + :func:`register` (launcher objects),
:class:`Pipeline`, :class:`Stage`, :class:`Resources`, :class:`Input`, :class:`BestCheckpoint`
(what to run). Nothing here
imports torch: launching must feel instant.
"""

__version__ = "0.1.0"

from .spec import BestCheckpoint, Input, Pipeline, Resources, Stage  # noqa: E402
from .workflow import LaunchOptions, Workflow, register  # noqa: E402

__all__ = ["BestCheckpoint", "Input", "LaunchOptions", "Pipeline", "Resources", "Stage", "Workflow", "register", "__version__"]
