"""Atomic file writes: a reader sees the old file or the complete new one, never half of it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: os.PathLike, obj: Any, fsync: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode(), fsync=fsync)


def read_json(path: os.PathLike, default: Any = None) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return default
