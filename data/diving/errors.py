"""Errors of the diving data package. Each message names the file or clip at fault and what to do."""

from __future__ import annotations

try:  # the core's base class: the CLI prints the message and exits with code 2
    from hpc_jobs.errors import UserError as _Base
except ImportError:  # pragma: no cover - the package is also usable on its own (inside a job)
    class _Base(Exception):
        exit_code = 2


class DivingDataError(_Base):
    """Bad or missing diving data (videos, annotations, frames). Exit code 2."""


class AnnotationError(DivingDataError):
    """An annotation or split pickle is unsafe, malformed or inconsistent."""


class ExtractError(DivingDataError):
    """Some videos could not be decoded into frames (missing, corrupt or truncated)."""


class FramesMissingError(DivingDataError):
    """A clip listed in a split has no extracted frames on disk."""


class DownloadError(DivingDataError):
    """A file could not be downloaded, or its size does not match."""
