"""Process helpers: trust a pid file only after checking /proc, stop daemons by PID.

In some sandboxes process 1 reaps exited processes late, so ``kill -0 PID`` can report a dead
daemon as alive. A pid is taken as a live daemon only if /proc/PID/stat is not a zombie (``Z``) and
/proc/PID/cmdline is the program we expect. Nothing here ever looks processes up by name.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Sequence


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 0 else None


def proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (``R``, ``S``, ``Z``...), None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may itself contain spaces or parentheses.
    rest = stat[stat.rfind(")") + 1 :].split()
    return rest[0] if rest else None


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def matches(pid: int, program: str, required_args: Sequence[str] = ()) -> bool:
    """True if PID is alive, runs ``program`` (basename of argv[0]) and has ``required_args`` in
    order somewhere in its argv."""
    if not is_alive(pid):
        return False
    argv = proc_cmdline(pid)
    if not argv or os.path.basename(argv[0]) != program:
        return False
    if not required_args:
        return True
    n = len(required_args)
    return any(tuple(argv[i : i + n]) == tuple(required_args) for i in range(len(argv) - n + 1))


def verified_pid(pid_file: Path, program: str, required_args: Sequence[str] = ()) -> int | None:
    """The pid in ``pid_file`` if it is a live ``program``; None otherwise (missing, stale, reused)."""
    pid = read_pid(pid_file)
    if pid is not None and matches(pid, program, required_args):
        return pid
    return None


def _reap(pid: int) -> None:
    """Reap ``pid`` if it happens to be our own child (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError:
        pass


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not is_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_pid(pid: int, term_timeout: float = 20.0) -> bool:
    """SIGTERM, wait, then SIGKILL. Returns True if it had to use SIGKILL."""
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return False
            raise
        if wait_gone(pid, timeout):
            return sig == signal.SIGKILL
    raise TimeoutError(f"process {pid} survived SIGKILL")
