"""Small file-system helpers: atomic writes and a lock. Nothing already written is ever half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional


def atomic_write_bytes(path: os.PathLike, data: bytes, mode: Optional[int] = 0o600, fsync: bool = True) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    The rename alone makes the write atomic for readers and against a crash of this process;
    ``fsync`` also makes it survive a power loss (skip it for files that can be rebuilt).
    ``mode=None`` gives the permissions a plain ``open()`` would (the umask's): for shared data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: os.PathLike, text: str, mode: Optional[int] = 0o600, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), mode, fsync)


def atomic_write_json(path: os.PathLike, data: Any, mode: Optional[int] = 0o600, fsync: bool = True,
                      indent: Any = None) -> None:
    # indent=None keeps json's C encoder (several times faster on a big run.json)
    atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n", mode, fsync)


def read_json(path: os.PathLike, default: Any = None, *, corrupt_ok: bool = False) -> Any:
    """The parsed file, or ``default`` when it does not exist (or, with ``corrupt_ok``, is not JSON)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default
    except ValueError:
        if corrupt_ok:
            return default
        raise


@contextlib.contextmanager
def exclusive_lock(path: os.PathLike, holder: str) -> Iterator[None]:
    """Non-blocking exclusive flock on ``path``; raises BlockingIOError with the holder's note."""
    import fcntl
    import time

    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note = ""
            for _ in range(50):  # the holder writes its note just after taking the lock: wait up to 1 s
                with open(path) as fh:
                    note = fh.read().strip()
                if note:
                    break
                time.sleep(0.02)
            raise BlockingIOError(note or "another process") from None
        locked = True
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        os.fsync(fd)
        yield
    finally:
        if locked:
            os.ftruncate(fd, 0)  # a note in the file always names the current holder
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def build_lock(target: os.PathLike) -> Iterator[None]:
    """Build ``target`` (a directory) one process at a time: a blocking exclusive flock on
    ``.NAME.lock`` beside it. Two launches that both need the same generated data set take turns,
    and the second finds it complete instead of deleting what the first is writing. Where the file
    system has no flock (some NFS mounts), it says so and builds without one."""
    import fcntl
    import logging

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # ENOLCK: no lock manager here
            logging.getLogger("hpc_jobs").warning("cannot lock %s (%s): building it without a lock", target, exc)
        yield
    finally:
        os.close(fd)  # closing releases the flock
