#!/usr/bin/env python3
"""hpc-jobs: python launch.py WORKFLOW [--gpus N] ... (python launch.py --help)."""
import sys

from hpc_jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
