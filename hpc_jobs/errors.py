"""Errors the user can act on.

Every error raised before anything is submitted is a :class:`UserError`: the command line prints its
one-line message and exits with code 2. The message names the bad value, the rule it broke and what
to do instead.
"""

import os
import sys


def command() -> str:
    """How the user runs hpc-jobs, for the commands that messages suggest: ``hpc-jobs`` (the
    installed command), ``python -m hpc_jobs`` or ``python launch.py`` (the checkout's, and the
    default). The command line exports it as HPC_JOBS_COMMAND, so jobs' messages (whose own
    program is submitit's or the runtime's) say the same; the program being run wins over it."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = os.path.basename(argv0)
    if name == "hpc-jobs":
        return "hpc-jobs"
    if name == "__main__.py" and os.path.basename(os.path.dirname(argv0)) == "hpc_jobs":
        return "python -m hpc_jobs"
    if name == "launch.py":
        return "python launch.py"
    return os.environ.get("HPC_JOBS_COMMAND") or "python launch.py"


class UserError(Exception):
    """Bad input or environment, detected before anything was submitted (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """A config key or value is unknown or ill-typed."""


class PreflightError(UserError):
    """A stage asks for something the cluster cannot give (partition, GPUs, time, account)."""


class RunLockedError(UserError):
    """Another launch or resume holds the run directory's lock."""


class SubmitError(UserError):
    """``sbatch`` refused a job. Stages submitted before it stay in the ledger and keep running;
    ``resume`` submits the rest once the cause is fixed (exit code 1: something may be queued)."""

    exit_code = 1


class StageInputError(RuntimeError):
    """Inside a job: an upstream output is missing or incomplete. Raised in the job's first seconds."""
