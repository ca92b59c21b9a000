"""How a stage says it stopped early on a signal: the exceptions the runtime records as REQUEUED
(requeue signal: a checkpoint was written, ``scontrol requeue`` asked) or TERMINATED. Raised by the
training engine and by the command wrapper (``launch.py run``); no torch here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class Interrupted(Exception):
    """Training stopped at a step boundary after writing ``checkpoint``."""

    exit_code = 1

    def __init__(self, message: str, *, step: Optional[int], epoch: Optional[int], checkpoint: Optional[Path], signal: int,
                 requeued: bool = False, cause: str | None = None) -> None:
        super().__init__(message)
        self.step, self.epoch, self.checkpoint = step, epoch, checkpoint
        self.signal, self.requeued = signal, requeued
        self.cause = cause  # PREEMPTED / TIMEOUT / REQUEUED (RunEnv.stop_cause), None if unknown


class Requeued(Interrupted):
    """The requeue signal arrived: checkpoint written; ``requeued`` says whether ``scontrol
    requeue`` succeeded (always False outside Slurm: the caller restarts the run itself)."""

    exit_code = 75  # EX_TEMPFAIL: "try again"


class Terminated(Interrupted):
    """SIGTERM arrived (cancel, time limit, preemption): checkpoint written, no requeue asked."""

    exit_code = 143  # 128 + SIGTERM
