"""``python -m hpc_jobs``: the same command line as ``hpc-jobs`` and ``python launch.py``."""
import sys

from hpc_jobs.cli import main

sys.exit(main())
