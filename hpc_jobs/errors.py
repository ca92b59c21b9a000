"""Errors the user can act on.

Every error raised before anything is submitted is a :class:`UserError`: the command line prints its
one-line message and exits with code 2. The message names the bad value, the rule it broke and what
to do instead.
"""


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
