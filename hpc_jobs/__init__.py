"""hpc-jobs: Slurm-native job framework for ML research pipelines."""

__version__ = "0.1.0"
