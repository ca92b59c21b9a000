"""The checkpoint file contract: atomic writes, a manifest that proves completeness, safe pruning.

A checkpoint ``X.pt`` is *complete* only when ``X.pt.manifest.json`` exists and matches the file
(size and sha256; optional companion files too, e.g. DeepSpeed's per-rank shards). The data file is
written to ``X.pt.tmp-<pid>``, fsynced and renamed over ``X.pt`` first; the manifest is written
(same way) last, so a writer killed at any moment leaves either no new checkpoint or an incomplete
one that ``verify_checkpoint`` refuses and ``latest_complete`` skips; older checkpoints are
untouched. Stages hand checkpoints to each other through this module.

Verification default: ``quick=False`` (size *and* sha256). ``quick=True`` checks sizes only: it
still catches every interrupted write (the manifest is written after the data is complete, and
an overwrite removes the old manifest first) but not bit rot or a copy that changed bytes; use it
where hashing multi-GB files on every start costs too much.

Torch is imported inside ``save_checkpoint``/``load_checkpoint`` only: the launch path imports
this module to verify handoffs without torch. Where torch is not installed at all (the core
``pip install hpc-jobs``, a workflow of plain Python objects), the state is pickled after a
``HPCJOBS-PICKLE`` header instead, and loaded back (with torch or without) by a pickle reader that,
with ``weights_only=True``, rebuilds only plain containers, numbers and strings.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

FORMAT = 1
MANIFEST_SUFFIX = ".manifest.json"
_TMP_MARK = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unusable; the message says what to do."""


@dataclass(frozen=True)
class Manifest:
    file: str
    size: int
    sha256: str
    step: int
    epoch: int
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    created: str = ""
    format: int = FORMAT
    # relative path (to the checkpoint's directory) -> {"size": int, "sha256": str}
    companions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def manifest_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + MANIFEST_SUFFIX)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp-<pid>`` + fsync + rename + fsync of the directory."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _companion_files(base: Path, companions: Iterable[str | os.PathLike]) -> dict:
    out = {}
    for comp in companions:
        comp = Path(comp)
        comp = comp if comp.is_absolute() else base / comp
        files = sorted(p for p in comp.rglob("*") if p.is_file()) if comp.is_dir() else [comp]
        for f in files:
            size, sha = _hash_file(f)
            out[os.path.relpath(f, base)] = {"size": size, "sha256": sha}
    return out


def _write_manifest(path: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=1, sort_keys=True, default=str)
    atomic_write_bytes(manifest_path(path), text.encode())


def save_checkpoint(path: str | os.PathLike, state: dict, *, step: int, epoch: int,
                    metrics: dict | None = None, meta: dict | None = None,
                    companions: Iterable[str | os.PathLike] = ()) -> Manifest:
    """Write ``state`` with ``torch.save`` atomically, then its manifest. ``companions`` are
    files or directories already written beside the checkpoint (e.g. DeepSpeed shards) whose
    sizes and hashes the manifest also records. Returns the manifest. Without torch installed the
    state is pickled instead (see the module docstring)."""
    try:
        import torch
    except ModuleNotFoundError:
        torch = None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An overwrite must never leave the old manifest describing new bytes.
    manifest_path(path).unlink(missing_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            if torch is not None:
                torch.save(state, f)
            else:
                f.write(PLAIN_HEADER)
                pickle.dump(state, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        size, sha = _hash_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    manifest = Manifest(
        file=path.name, size=size, sha256=sha, step=int(step), epoch=int(epoch),
        metrics=dict(metrics or {}), meta=dict(meta or {}),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        companions=_companion_files(path.parent, companions),
    )
    _write_manifest(path, manifest)
    return manifest


def _parse_manifest(path: Path) -> Manifest:
    """Read the manifest of ``path``; raises ValueError/OSError/TypeError (no hint)."""
    data = json.loads(manifest_path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"format {data.get('format') if isinstance(data, dict) else '?'}, expected {FORMAT}")
    return Manifest.from_dict(data)


def _problem(path: Path, quick: bool) -> tuple[str | None, Manifest | None]:
    """Why ``path`` is not a complete checkpoint (None when it is), and its manifest if readable."""
    mpath = manifest_path(path)
    if not path.exists():
        if mpath.exists():
            return f"checkpoint {path} is missing but its manifest exists (deleted or moved without it?)", None
        return f"no checkpoint at {path}", None
    if not mpath.exists():
        return (f"incomplete checkpoint {path}: its manifest {mpath.name} is missing (was the writer "
                "killed before it finished?)"), None
    try:
        manifest = _parse_manifest(path)
    except (ValueError, TypeError, OSError) as exc:
        return f"unreadable manifest {mpath} ({exc}): delete the checkpoint and its manifest", None
    files = [(path, manifest.size, manifest.sha256, "checkpoint")]
    files += [(path.parent / rel, info["size"], info["sha256"], f"companion of {path.name}")
              for rel, info in manifest.companions.items()]
    for file, size, sha, what in files:
        if not file.exists():
            return f"incomplete {what}: {file} is missing", manifest
        actual = file.stat().st_size
        if actual != size:
            return (f"incomplete {what} {file}: {actual} bytes on disk, manifest says {size} (was the "
                    "writer killed or the copy truncated?)"), manifest
        if not quick and _hash_file(file)[1] != sha:
            return (f"corrupt {what} {file}: its sha256 differs from the manifest (changed on disk "
                    "after it was written: disk error or a partial copy)"), manifest
    return None, manifest


def _fallback_hint(path: Path) -> str:
    """Name the newest other complete checkpoint of the same directory (not a link to the same
    bytes), if any."""
    try:
        inode = path.stat().st_ino if path.exists() else None
        for other, _ in _candidates(path.parent, "*.pt", exclude=(path.name,)):
            if other.stat().st_ino != inode and _problem(other, True)[0] is None:
                return f"the previous checkpoint {other} is still usable"
    except OSError:
        pass
    return "no other complete checkpoint in that directory"


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of checkpoint ``path`` as written, without checking the data file."""
    path = Path(path)
    if not manifest_path(path).exists():
        raise CheckpointError(
            f"incomplete checkpoint {path}: its manifest {manifest_path(path).name} is missing (was the "
            f"writer killed before it finished?); {_fallback_hint(path)}")
    try:
        return _parse_manifest(path)
    except (ValueError, TypeError, OSError) as exc:
        raise CheckpointError(f"unreadable manifest {manifest_path(path)} ({exc}): delete the checkpoint "
                              f"and its manifest; {_fallback_hint(path)}") from None


def verify_checkpoint(path: str | os.PathLike, *, quick: bool = False) -> Manifest:
    """Return the manifest of a complete checkpoint or raise ``CheckpointError`` with a one-line
    message naming the problem and the previous usable checkpoint. ``quick=True`` compares sizes
    only (see the module docstring)."""
    path = Path(path)
    problem, manifest = _problem(path, quick)
    if problem is not None:
        raise CheckpointError(f"{problem}; {_fallback_hint(path)}")
    assert manifest is not None
    return manifest


#: classes that safe loading (``weights_only=True``) may rebuild besides tensors and containers
SAFE_GLOBALS = (argparse.Namespace,)
#: the first bytes of a checkpoint written without torch (a pickle follows)
PLAIN_HEADER = b"HPCJOBS-PICKLE-1\n"


class _SafeUnpickler(pickle.Unpickler):
    """Plain containers, numbers and strings, plus SAFE_GLOBALS; no other class or function."""

    def find_class(self, module: str, name: str) -> Any:
        for cls in SAFE_GLOBALS:
            if (cls.__module__, cls.__qualname__) == (module, name):
                return cls
        raise pickle.UnpicklingError(f"weights_only: {module}.{name} is not an allowed global")


def _load_plain(path: Path, weights_only: bool) -> dict:
    with open(path, "rb") as f:
        data = f.read()[len(PLAIN_HEADER):]
    try:
        return _SafeUnpickler(io.BytesIO(data)).load() if weights_only else pickle.loads(data)
    except Exception as exc:  # pickle errors come in many types
        if weights_only and "weights_only" in str(exc):
            raise CheckpointError(
                f"{path} holds Python objects that safe loading refuses ({exc}); "
                "load it with weights_only=False only if you trust where it came from") from None
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc


def _is_plain(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PLAIN_HEADER)) == PLAIN_HEADER
    except OSError:
        return False


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True, *,
                    quick: bool = False, weights_only: bool = True) -> dict:
    """Verify (unless ``verify=False``) and ``torch.load`` a checkpoint. ``weights_only=True``
    refuses pickled code; checkpoints written by the engine load that way. A checkpoint written
    without torch loads without it (``map_location`` does not apply)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path, quick=quick)
    elif not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if _is_plain(path):
        return _load_plain(path, weights_only)
    try:
        import torch
    except ModuleNotFoundError:
        raise CheckpointError(f"{path} was written by torch.save: loading it needs torch "
                              f"(pip install 'hpc-jobs[workflows]')") from None
    try:
        # Published research checkpoints often pickle their argparse.Namespace next to the weights
        # (the ISC 2021 winners' do): a plain attribute bag, safe to rebuild, so allow it.
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # pickle errors come in many types
        if weights_only and "weights_only" in str(exc):
            raise CheckpointError(
                f"{path} holds Python objects that safe loading refuses ({str(exc).splitlines()[0]}); "
                "load it with weights_only=False only if you trust where it came from") from None
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc


def _candidates(directory: Path, pattern: str, exclude: Iterable[str] = ()) -> list[tuple[Path, Manifest]]:
    """Checkpoints matching ``pattern`` that have a readable manifest, newest step first."""
    found = []
    skip = set(exclude)
    for p in directory.glob(pattern):
        name = p.name
        if name in skip or _TMP_MARK in name or name.endswith(MANIFEST_SUFFIX) or not p.is_file():
            continue
        try:
            m = _parse_manifest(p) if manifest_path(p).exists() else None
        except (ValueError, TypeError, OSError):
            m = None
        if m is not None:
            found.append((p, m))
    found.sort(key=lambda pm: (pm[1].step, pm[0].stat().st_mtime_ns), reverse=True)
    return found


def latest_complete(directory: str | os.PathLike, pattern: str = "step-*.pt", *, quick: bool = False,
                    exclude: Iterable[str] = ()) -> Path | None:
    """The newest (by manifest step) checkpoint in ``directory`` whose manifest verifies,
    skipping incomplete ones; None when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for p, _ in _candidates(directory, pattern, exclude):
        if _problem(p, quick)[0] is None:
            return p
    return None


def best_complete(directory: str | os.PathLike, metric: str, mode: str = "max", pattern: str = "*.pt", *,
                  quick: bool = False) -> tuple[Path, Manifest] | None:
    """The complete checkpoint in ``directory`` whose manifest ``metrics[metric]`` is the highest
    (``mode="max"``) or lowest (``"min"``); ties go to the later step (``best.pt``/``last.pt``
    links count as the step they publish). None when no complete checkpoint has the metric."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    scored = []
    for p, m in _candidates(directory, pattern):
        value = m.metrics.get(metric) if isinstance(m.metrics, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            scored.append((float(value) if mode == "max" else -float(value), m.step, p.name.startswith("step-"), p, m))
    for *_, p, m in sorted(scored, key=lambda t: t[:3], reverse=True):
        if _problem(p, quick)[0] is None:
            return p, m
    return None


def link_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Manifest:
    """Publish complete checkpoint ``src`` also as ``dst`` (e.g. ``best.pt``, ``last.pt``):
    a hard link (a copy where links are impossible) renamed into place, then its own manifest."""
    src, dst = Path(src), Path(dst)
    manifest = verify_checkpoint(src, quick=True)
    if src.resolve() == dst.resolve():
        return manifest
    manifest_path(dst).unlink(missing_ok=True)
    tmp = _tmp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    companions = {os.path.relpath(src.parent / rel, dst.parent): info
                  for rel, info in manifest.companions.items()}
    linked = Manifest.from_dict({**manifest.to_dict(), "file": dst.name, "companions": companions})
    _write_manifest(dst, linked)
    return linked


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _remove_checkpoint(path: Path, protected_companions: set[str]) -> None:
    try:
        manifest = _parse_manifest(path) if manifest_path(path).exists() else None
    except (ValueError, TypeError, OSError):
        manifest = None
    manifest_path(path).unlink(missing_ok=True)  # first: a half-removed checkpoint reads incomplete
    path.unlink(missing_ok=True)
    if manifest:
        tops = {Path(rel).parts[0] for rel in manifest.companions}
        for top in tops - protected_companions:
            target = path.parent / top
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)


def prune(directory: str | os.PathLike, keep: int = 2, pattern: str = "step-*.pt", *,
          protect: Iterable[str] = ("best.pt", "last.pt"), orphans: str | None = None) -> list[Path]:
    """Remove step checkpoints older than the ``keep`` newest complete ones (complete or not),
    their companions, and stale temporary files. Nothing is removed until a complete checkpoint
    exists; files named in ``protect`` (and companions they reference) are never removed.
    ``orphans`` (e.g. ``"step-*.ds"``) names companion files/directories that a killed writer may
    have left without a manifest: those older than the kept checkpoints and referenced by no
    manifest are removed too. Returns the removed paths."""
    directory = Path(directory)
    keep = max(1, int(keep))
    if not directory.is_dir():
        return []
    complete = [(p, m) for p, m in _candidates(directory, pattern) if _problem(p, True)[0] is None]
    if not complete:
        return []
    keepers = complete[:keep]
    oldest_kept_step = min(m.step for _, m in keepers)
    oldest_kept_mtime = min(p.stat().st_mtime_ns for p, _ in keepers)
    protected = set(protect) | {p.name for p, _ in keepers}
    protected_companions: set[str] = set()
    for name in protected:
        mp = directory / name
        if manifest_path(mp).exists():
            try:
                protected_companions |= {Path(rel).parts[0] for rel in _parse_manifest(mp).companions}
            except (ValueError, TypeError, OSError):
                pass
    removed = []
    manifests = {p.name: m for p, m in _candidates(directory, pattern)}
    for p in sorted(directory.glob(pattern)):
        name = p.name
        if name in protected or _TMP_MARK in name or name.endswith(MANIFEST_SUFFIX) or not p.is_file():
            continue
        m = manifests.get(name)
        older = m.step < oldest_kept_step if m else p.stat().st_mtime_ns < oldest_kept_mtime
        if older:
            _remove_checkpoint(p, protected_companions)
            removed.append(p)
    if orphans:
        referenced = set(protected_companions)
        for _, m in _candidates(directory, "*.pt"):
            referenced |= {Path(rel).parts[0] for rel in m.companions}
        for orphan in directory.glob(orphans):
            if orphan.name not in referenced and orphan.stat().st_mtime_ns < oldest_kept_mtime:
                if orphan.is_dir():
                    shutil.rmtree(orphan, ignore_errors=True)
                else:
                    orphan.unlink(missing_ok=True)
                removed.append(orphan)
    for tmp in directory.glob(f"*{_TMP_MARK}*"):
        pid = tmp.name.rsplit(_TMP_MARK, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed

