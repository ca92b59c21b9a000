"""Test-only workflows, found by the core when ``HPC_JOBS_LAUNCHERS=tests.workflows`` is set.

They are snapshotted with each run like ``launchers/`` (``hpc_jobs.ledger.Run.snapshot_code``), so
jobs on the dev cluster import them from the run directory.
"""
