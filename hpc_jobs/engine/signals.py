"""The one signal contract: the requeue signal (USR2 by default) and SIGTERM only set a flag; the
training loop acts on it at the next optimizer-step boundary.

While ``fit()`` runs, these handlers *replace* any other handler for the same signals (submitit's,
Lightning's, a user's) and the previous ones are restored when it returns: exactly one component
answers the signal, so it cannot be checkpointed twice or requeued by two parties.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from hpc_jobs.environment import take_pending_signals

REQUEUE = 1  # bit set by the requeue signal
TERMINATE = 2  # bit set by SIGTERM


def signal_number(name: str) -> int:
    try:
        return int(getattr(signal, "SIG" + name.upper().removeprefix("SIG")))
    except AttributeError:
        raise ValueError(f"unknown signal {name!r}; use a name such as USR1, USR2, TERM") from None


class StopFlag:
    """Context manager installing the handlers; ``bits`` is REQUEUE | TERMINATE as received."""

    def __init__(self, requeue_signal: str = "USR2") -> None:
        self.requeue_signum = signal_number(requeue_signal)
        self.bits = 0
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        self.bits |= REQUEUE if signum == self.requeue_signum else TERMINATE

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            print("[engine] fit() is not on the main thread: no signal handlers, so no checkpoint "
                  "on requeue/termination signals", file=sys.stderr, flush=True)
            return self
        for signum in {self.requeue_signum, signal.SIGTERM}:
            self._previous[signum] = signal.signal(signum, self._handle)
        for signum in take_pending_signals():  # arrived during start-up (catch_stop_signals)
            self._handle(signum, None)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
