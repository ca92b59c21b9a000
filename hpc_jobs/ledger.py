"""The run ledger: one directory per launch that records what ran, with which code, where.

``<runs root>/<workflow>/<run id>/``::

    run.json        stages, job ids, dependencies, scripts, states (rewritten atomically)
    config.yaml     the resolved workflow config         profile.yaml  the cluster profile
    command.txt     the command line                      git.diff      uncommitted changes at launch
    code/           snapshot of the code the jobs import (editing the checkout changes nothing queued)
    stages/<name>/  job.sbatch, logs (slurm/), state markers, outputs

Run directories are private (0700): they hold pickles that jobs execute.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import __version__
from .errors import RunLockedError, UserError
from .fsutil import atomic_write_json, atomic_write_text, exclusive_lock, read_json
from .profiles import REPO_ROOT, hpc_jobs_home
from .record import StageRecord

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
CODE_PACKAGES = ("hpc_jobs", "launchers", "models", "data")
CODE_SUFFIXES = {".py", ".j2", ".yaml", ".yml", ".json", ".txt"}


def new_run_id(name: Optional[str] = None) -> str:
    if name is not None:
        if name in ("last", "latest"):
            raise UserError(f"run name '{name}' is reserved: it means the newest run in status, logs and resume; "
                            f"choose another --run-name")
        if not RUN_NAME_RE.match(name) or ".." in name:
            raise UserError(
                f"run name '{name}' is invalid: use letters, digits, '.', '_' and '-' "
                f"(no spaces, slashes or shell characters), at most 80, starting with a letter or digit"
            )
        return name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.urandom(2).hex()}"


def git_state() -> Tuple[Optional[str], Optional[str]]:
    """The checkout's HEAD and ``git diff HEAD`` (both None outside a git checkout), asked at once."""
    try:
        procs = [subprocess.Popen(["git", "-C", str(REPO_ROOT), *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
                 for args in (("rev-parse", "HEAD"), ("diff", "HEAD"))]
    except OSError:
        return None, None
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out = None
        outs.append(out if proc.returncode == 0 else None)
    sha = (outs[0] or "").strip() or None
    return sha, (outs[1] if sha else None)


#: in a runs root: the path (relative to it) of the newest complete code snapshot, which the next
#: launch links unchanged files from
LAST_SNAPSHOT_FILE = ".last-code"
#: a source file changed less than this before an earlier copy of it may have changed during it:
#: copied again rather than linked (git's "racily clean" rule)
_RACY_S = 1.0


class _Linker:
    """Puts one file of a snapshot in place: a hard link to the previous snapshot's copy when the
    source is unchanged since that copy was taken (same size and modification time, which the copy
    keeps, and the source's inode change time, which no tool can set back, older than the copy by
    :data:`_RACY_S`; the copy is this user's), else a fresh copy. Links are a directory entry
    each instead of a file's data, so a launch whose code did not change writes almost nothing.
    Where the previous snapshot is gone or on another file system it simply copies."""

    def __init__(self, previous: Optional[Path]) -> None:
        self.previous = previous
        self.linked = self.copied = 0

    def place(self, src: Path, target: Path, rel: Path) -> None:
        if self.previous is not None:
            old = self.previous / rel
            try:
                st, prev = os.stat(src), os.stat(old)
            except OSError:
                prev = None
            if (prev is not None and prev.st_size == st.st_size and prev.st_mtime_ns == st.st_mtime_ns
                    and st.st_ctime < prev.st_ctime - _RACY_S and prev.st_uid == os.getuid()):
                try:
                    os.link(old, target)
                    self.linked += 1
                    return
                except OSError:  # another file system, no hard links, too many links: copy from now on
                    self.previous = None
        shutil.copy2(src, target)
        self.copied += 1

    def tree(self, src: Path, target: Path, rel: Path, ignore) -> None:
        """``src``'s code files into ``target`` (created), as ``shutil.copytree`` with ``ignore``."""
        target.mkdir(parents=True, exist_ok=True)
        names = os.listdir(src)
        skip = set(ignore(str(src), names))
        for name in names:
            if name in skip:
                continue
            path = src / name
            if path.is_dir():
                self.tree(path, target / name, rel / name, ignore)
            else:
                self.place(path, target / name, rel / name)


def last_snapshot(runs_root: Path) -> Optional[Path]:
    """The newest complete code snapshot under ``runs_root`` (see :data:`LAST_SNAPSHOT_FILE`)."""
    try:
        rel = (Path(runs_root) / LAST_SNAPSHOT_FILE).read_text().strip()
    except OSError:
        return None
    path = Path(runs_root) / rel
    return path if rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts and path.is_dir() else None


def note_snapshot(runs_root: Path, code_dir: Path) -> None:
    """Name ``code_dir`` (complete, under ``runs_root``) the snapshot the next launch links from."""
    try:
        atomic_write_text(Path(runs_root) / LAST_SNAPSHOT_FILE, str(Path(code_dir).relative_to(runs_root)) + "\n",
                          fsync=False)
    except (OSError, ValueError):  # a read-only or foreign runs root: the next launch copies everything
        return


def snapshot_code(dest: Path, previous: Optional[Path] = None) -> Path:
    """Copy the importable code (not data, not caches) into ``dest`` (made here): the code packages
    of this checkout, HPC_JOBS_LAUNCHERS packages and modules, entry points' packages, the
    templates and profiles. Returns ``dest``.

    ``previous``: an earlier snapshot (:func:`last_snapshot`); each file unchanged since it was
    taken becomes a hard link to its copy there instead of a new copy (:class:`_Linker`). A
    snapshot is never written to after its launch, so the runs that share a file never see it
    change (edit the checkout and launch again, never a run's ``code/``)."""
    def ignore(directory: str, names: List[str]) -> List[str]:
        return [
            n
            for n in names
            if n == "__pycache__"
            or n.startswith(".")
            or (os.path.isfile(os.path.join(directory, n)) and Path(n).suffix not in CODE_SUFFIXES)
        ]

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    linker = _Linker(Path(previous) if previous is not None else None)
    for package in CODE_PACKAGES:
        src = REPO_ROOT / package
        if src.is_dir():
            linker.tree(src, dest / package, Path(package), ignore)
    from .profiles import TEMPLATES_DIR
    from .workflow import launcher_code

    # HPC_JOBS_LAUNCHERS packages and modules (a .py path too), entry points' packages
    for name, src in launcher_code():
        if name.split(".")[0] in CODE_PACKAGES:
            continue
        rel = Path(*name.split("."))
        target = dest / rel
        if src.is_dir():
            if not target.exists():
                linker.tree(src, target, rel, ignore)
        else:  # a module: a .py file
            target, rel = target.with_name(src.name), rel.with_name(src.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                linker.place(src, target, rel)
    # the template and profiles (package data: in an installed wheel they sit in hpc_jobs/ already)
    linker.tree(TEMPLATES_DIR, dest / "templates", Path("templates"), ignore)
    return dest


def _index_file() -> Path:
    return hpc_jobs_home() / "recent-runs.txt"


class Run:
    """A run directory and its ``run.json``."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.record: Dict[str, Any] = {}  # the run-level fields of run.json (backend, order, ...)
        self.stages: Dict[str, StageRecord] = {}  # its stage entries, typed
        self._load()

    def _load(self) -> None:
        #: why run.json could not be read (truncated, not a run record); None when it could
        self.damaged: Optional[str] = None
        try:
            data = read_json(self.dir / "run.json", default={}) or {}
            if not isinstance(data, dict):
                raise ValueError(f"holds a {type(data).__name__}, not a run record")
            self.stages = {name: StageRecord.from_dict({"name": name, **entry})
                           for name, entry in (data.pop("stages", None) or {}).items()}
        except (ValueError, TypeError, AttributeError, KeyError, OSError) as exc:
            self.damaged = f"{self.dir / 'run.json'} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            data, self.stages = {}, {}
        self.record = data

    # -- identity -------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.record.get("run") or self.dir.name

    @property
    def workflow(self) -> str:
        return self.record.get("workflow", self.dir.parent.name)

    @property
    def backend(self) -> str:
        return self.record.get("backend", "")

    @property
    def order(self) -> List[str]:
        return list(self.record.get("order") or self.stages)

    def in_order(self) -> List[StageRecord]:
        return [self.stages[name] for name in self.order if name in self.stages]

    def ancestors(self, name: str) -> List[str]:
        """Stages upstream of ``name``, in pipeline order."""
        found, frontier = set(), list(self.stage(name).depends_on)
        while frontier:
            current = frontier.pop()
            if current not in found:
                found.add(current)
                frontier.extend(self.stage(current).depends_on)
        return [n for n in self.order if n in found]

    def descendants(self, names: List[str]) -> List[str]:
        """Stages downstream of any of ``names`` (not including them), in pipeline order."""
        found, frontier = set(), list(names)
        while frontier:
            current = frontier.pop()
            for child in (n for n in self.order if current in self.stages[n].depends_on):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
        return [n for n in self.order if n in found]

    def task_dir(self, stage: str, task: Optional[int]) -> Path:
        from .runtime import task_dir

        return task_dir(self.stage_dir(stage), task)

    @property
    def code_dir(self) -> Path:
        return self.dir / "code"

    def stage_dir(self, stage: str) -> Path:
        return self.dir / "stages" / stage

    def stage(self, name: str) -> StageRecord:
        try:
            return self.stages[name]
        except KeyError:
            known = ", ".join(self.stages)
            raise UserError(f"run {self.id} has no stage '{name}' (stages: {known})") from None

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_root: Path, workflow: str, run_id: str) -> "Run":
        run_dir = Path(runs_root) / workflow / run_id
        if run_dir.exists():
            raise UserError(f"run directory {run_dir} exists already: choose another --run-name, or resume it")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(run_dir, 0o700)
        os.chmod(run_dir, 0o700)  # umask-proof
        run = cls(run_dir)
        run.record = {"run": run_id, "workflow": workflow}
        return run

    def write_provenance(self, argv: List[str], config_text: str, profile_text: str,
                         git: Optional[Tuple[Optional[str], Optional[str]]] = None) -> None:
        """``git``: (sha, diff) from :func:`git_state` when the caller asked for it earlier."""
        atomic_write_text(self.dir / "command.txt", " ".join(argv) + "\n", fsync=False)
        atomic_write_text(self.dir / "config.yaml", config_text, fsync=False)
        atomic_write_text(self.dir / "profile.yaml", profile_text, fsync=False)
        sha, diff = git if git is not None else git_state()
        if diff:
            atomic_write_text(self.dir / "git.diff", diff, fsync=False)
        self.record.update(
            {
                "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "user": getpass.getuser(),
                "host": socket.gethostname(),
                "command": argv,
                "hpc_jobs_version": __version__,
                "python": sys.executable,
                "git": {"sha": sha, "dirty": bool(diff)},
            }
        )

    def snapshot_code(self, prepared: Optional[Path] = None, previous: Optional[Path] = None) -> None:
        """Copy the importable code (not data, not caches) into ``code/``; ``prepared``: a copy
        :func:`snapshot_code` made earlier (while the launch was checking the plan), moved in;
        ``previous``: an earlier snapshot to link unchanged files from."""
        if prepared is not None:
            try:
                os.rename(prepared, self.code_dir)
                return
            except OSError:  # another file system: copy it here after all
                pass
        snapshot_code(self.code_dir, previous)

    def remember(self) -> None:
        """Append to the per-user index so ``status`` finds the run from any shell."""
        index = _index_file()
        index.parent.mkdir(parents=True, exist_ok=True)
        with open(index, "a") as fh:
            fh.write(f"{self.dir}\n")

    # -- persistence ----------------------------------------------------------------------------
    def save(self, durable: bool = True) -> None:
        """Rewrite run.json atomically; ``durable=False`` skips the fsync (a later save makes it)."""
        data = dict(self.record)
        data["stages"] = {name: rec.to_dict() for name, rec in self.stages.items()}
        atomic_write_json(self.dir / "run.json", data, fsync=durable)

    def set_state(self, name: str, state: str, **fields: Any) -> None:
        """Set a stage's state (and other fields of its record), then save run.json."""
        rec = self.stage(name)
        rec.state = state
        for key, value in fields.items():
            setattr(rec, key, value)
        self.save()

    def reload(self) -> "Run":
        self._load()
        return self

    def lock(self, action: str):
        """One launch/resume/cancel at a time per run; the second says who holds it."""
        holder = f"{action} by {getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {_dt.datetime.now():%H:%M:%S}"
        cm = exclusive_lock(self.dir / ".lock", holder)

        class _Lock:
            def __enter__(self_inner):
                try:
                    cm.__enter__()
                except BlockingIOError as exc:
                    raise RunLockedError(f"run {self.id} is locked ({exc}): wait for it to finish") from None

            def __exit__(self_inner, *exc):
                return cm.__exit__(*exc)

        return _Lock()


def recent_runs(limit: int = 10) -> List[Run]:
    seen: List[Path] = []
    try:
        lines = _index_file().read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in reversed(lines):
        path = Path(line.strip())
        if path not in seen and (path / "run.json").exists():
            seen.append(path)
        if len(seen) >= limit:
            break
    return [Run(p) for p in seen]


def _readable(run: Run) -> Run:
    if run.damaged:
        raise UserError(f"run {run.dir.name}: {run.damaged}; its files are still there (stages/), "
                        f"but hpc-jobs cannot read its record")
    return run


def find_run(ref: str) -> Run:
    """A run by directory path, by run id, or ``last``."""
    candidate = Path(ref).expanduser()
    if (candidate / "run.json").exists():
        return _readable(Run(candidate))
    runs = recent_runs(limit=1000)
    if ref in ("last", "latest") and runs:
        return _readable(runs[0])
    for run in runs:
        if run.id == ref or run.dir.name == ref:
            return _readable(run)
    hint = f" Recent runs: {', '.join(r.id for r in runs[:5])}" if runs else " No runs recorded yet."
    raise UserError(f"no run '{ref}' found (give a run id, a run directory or 'last').{hint}")

