"""Workflows of an example lab package, registered with hpc-jobs by entry point (pyproject.toml)."""
