"""Bring the development Slurm cluster up, down, and report on it.

Standard library only: ``python3 -m hpc_jobs.devcluster up`` must work on a machine that has no
virtualenv yet. See ``config.py`` for the shape of the cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import config as C
from .procs import read_pid, stop_pid, verified_pid

# runc: Slurm's OCI containers (srun --container); Debian's crun fails on this kind of machine's
# hybrid cgroup layout ("cgroups in hybrid mode not supported")
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server", "runc")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
HOSTS_FILE = Path("/etc/hosts")
MUNGE_RUN_DIR = Path("/run/munge")  # munged's default socket lives here; clients look for it
HOSTS_TAG = "# hpc_jobs.devcluster"

# Node states (sinfo %T) in which a node counts as up. Anything with a "*" (not responding),
# "down", "drain", "fail" or "unknown" does not.
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


class DevClusterError(RuntimeError):
    """The cluster could not be brought to the requested state (see the message)."""


class NotSupportedError(DevClusterError):
    """This machine cannot host the dev cluster (not root, no apt-get...)."""


@dataclass(frozen=True)
class Daemon:
    """One daemon we start: how to recognise it in /proc and where its pid file and log live."""

    name: str
    program: str
    pid_file: Path
    log_file: Path
    required_args: tuple[str, ...] = ()

    def pid(self) -> int | None:
        """Its pid if the pid file names a live process running this program, else None."""
        return verified_pid(self.pid_file, self.program, self.required_args)


@dataclass
class DaemonStatus:
    name: str
    state: str  # "running", "stopped" or "stale pid file"
    pid: int | None
    log_file: Path


@dataclass
class ClusterStatus:
    daemons: list[DaemonStatus]
    nodes: dict[str, str]  # node -> sinfo state, empty if slurmctld does not answer
    sinfo: str

    @property
    def up(self) -> bool:
        return all(d.state == "running" for d in self.daemons) and all(
            self.nodes.get(n) in USABLE_NODE_STATES for n in C.NODES
        )

    def __str__(self) -> str:
        lines = [format_table(self.daemons)]
        lines.append("")
        lines.append(self.sinfo.rstrip() if self.sinfo else "sinfo: slurmctld does not answer")
        lines.append("")
        lines.append(f"{C.CLUSTER_NAME} is {'UP' if self.up else 'NOT up'}")
        return "\n".join(lines)


@dataclass
class UpResult:
    actions: list[str]
    daemons: list[DaemonStatus]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def format_table(daemons: Iterable[DaemonStatus]) -> str:
    rows = [("daemon", "state", "pid", "log")]
    rows += [(d.name, d.state, str(d.pid or "-"), str(d.log_file)) for d in daemons]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows
    )


def _clean_env() -> dict[str, str]:
    """Environment for the daemons: ours minus any Slurm job variables we may be running under."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_"))}


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    """Write ``text`` to ``path`` (atomically) unless it already holds it. True if written."""
    try:
        if path.read_text() == text and stat.S_IMODE(path.stat().st_mode) == mode:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def _system_python3() -> str:
    """The host's python3 (not a virtualenv's): slurmstepd runs oci.conf's RunTimeRun with it."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else (shutil.which("python3") or "python3")


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(argv, **kw)


class DevCluster:
    """A one-host Slurm cluster emulating nodes n1 and n2, each with 4 CPUs and 2 fake GPUs.

    Usage::

        cluster = DevCluster()
        cluster.up()              # idempotent; prints what it started
        assert cluster.is_up()
        print(cluster.status())   # daemons, pids, logs, sinfo
        cluster.down(purge=False)

    ``up`` and ``down`` need root; ``status`` and ``is_up`` do not.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike | None = None,
        echo: Callable[[str], None] | None = None,
        timeout: float = 90.0,
    ) -> None:
        self.layout = C.Layout(Path(state_dir) if state_dir else C.default_state_dir())
        self.timeout = timeout
        self._echo = echo if echo is not None else (lambda msg: print(msg, flush=True))

    # ---------------------------------------------------------------- the daemons, in start order
    def daemons(self) -> list[Daemon]:
        L = self.layout
        return [
            Daemon("munged", "munged", L.munge_dir / "munged.pid", L.munge_dir / "munged.log"),
            Daemon(
                "mariadbd", "mariadbd", L.mariadb_dir / "mariadbd.pid", L.mariadb_dir / "mariadbd.log"
            ),
            Daemon("slurmdbd", "slurmdbd", L.run_dir / "slurmdbd.pid", L.log_dir / "slurmdbd.log"),
            Daemon("slurmctld", "slurmctld", L.run_dir / "slurmctld.pid", L.log_dir / "slurmctld.log"),
        ] + [
            Daemon(
                f"slurmd {n}", "slurmd", L.run_dir / f"slurmd-{n}.pid", L.log_dir / f"slurmd-{n}.log",
                ("-N", n),
            )
            for n in C.NODES
        ]

    def _daemon(self, name: str) -> Daemon:
        return next(d for d in self.daemons() if d.name == name)

    # ---------------------------------------------------------------------------- public API
    def status(self) -> ClusterStatus:
        statuses = []
        for d in self.daemons():
            pid = d.pid()
            if pid:
                state = "running"
            elif read_pid(d.pid_file) is not None:
                state = "stale pid file"
            else:
                state = "stopped"
            statuses.append(DaemonStatus(d.name, state, pid, d.log_file))
        nodes, sinfo = {}, ""
        if any(s.name == "slurmctld" and s.pid for s in statuses) and shutil.which("sinfo"):
            nodes = self._node_states()
            res = _run(["sinfo", "-N", "-o", "%8N %10P %10T %5c %8m %G"], timeout=15)
            sinfo = res.stdout if res.returncode == 0 else res.stderr
        return ClusterStatus(statuses, nodes, sinfo)

    def is_up(self) -> bool:
        return self.status().up

    @contextlib.contextmanager
    def _locked(self):
        """One `up` or `down` at a time on this machine."""
        lock = self.layout.state_dir.with_name(self.layout.state_dir.name + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def up(self, cancel_jobs: bool = False) -> UpResult:
        """Start whatever is not running and wait until the nodes are usable. ``cancel_jobs``
        also cancels every job in the queue (slurmctld recovers the jobs of its last life from
        its saved state) and waits until the nodes are idle."""
        self._require_root("up")
        with self._locked():
            return self._up(cancel_jobs)

    def _up(self, cancel_jobs: bool = False) -> UpResult:
        t0 = time.monotonic()
        phases: dict[str, float] = {}
        actions: list[str] = []

        self._check_foreign_config()
        t = time.monotonic()
        if self._install_packages():
            actions.append("installed Slurm, munge and MariaDB packages")
        phases["packages"] = time.monotonic() - t

        t = time.monotonic()
        actions += self._prepare_host()
        changed_files = self._write_config()
        actions += [f"wrote {p}" for p in changed_files]
        actions += self._build_oci_bundle()
        phases["config"] = time.monotonic() - t

        t = time.monotonic()
        actions += self._start_daemons(self._restarts_for(changed_files))
        phases["daemons"] = time.monotonic() - t

        t = time.monotonic()
        actions += self._wait_nodes_usable()
        if cancel_jobs:
            actions += self._cancel_all_jobs()
            actions += self._wait_nodes_usable(idle=True)
        self._wait_accounting()
        phases["nodes"] = time.monotonic() - t

        result = UpResult(actions, self.status().daemons, time.monotonic() - t0, phases)
        if result.changed:
            for a in actions:
                self._echo(f"  - {a}")
        self._echo(format_table(result.daemons))
        if result.changed:
            detail = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
            self._echo(f"{C.CLUSTER_NAME} is up: nodes {', '.join(C.NODES)} idle, sacct answers "
                       f"({result.seconds:.1f} s: {detail})")
        else:
            self._echo(f"{C.CLUSTER_NAME} was already up; nothing changed ({result.seconds:.1f} s).")
        return result

    def down(self, purge: bool = False) -> list[str]:
        """Stop every daemon we started (by the PID in its pid file). ``purge`` also removes all
        state: spool directories, logs, the munge key, the accounting database and our files in
        /etc/slurm. Returns what it did."""
        self._require_root("down")
        with self._locked():
            return self._down(purge)

    def _down(self, purge: bool) -> list[str]:
        actions: list[str] = []
        if purge:
            actions += self._cancel_all_jobs()
        for d in reversed(self.daemons()):
            pid = d.pid()
            if pid:
                killed = stop_pid(pid, term_timeout=30.0)
                actions.append(f"stopped {d.name} (pid {pid}{', SIGKILL' if killed else ''})")
            if d.pid_file.exists():
                d.pid_file.unlink()
        if purge:
            if self.layout.state_dir.exists():
                shutil.rmtree(self.layout.state_dir)
                actions.append(f"removed {self.layout.state_dir}")
            for path in self.layout.conf_files:
                if self._is_ours(path):
                    path.unlink()
                    actions.append(f"removed {path}")
        for a in actions:
            self._echo(f"  - {a}")
        self._echo(f"{C.CLUSTER_NAME} is down" + (" and purged." if purge else ".")
                   if actions else f"{C.CLUSTER_NAME} was not running; nothing to do.")
        return actions

    # --------------------------------------------------------------------------- host set-up
    def _require_root(self, what: str) -> None:
        if os.geteuid() != 0:
            raise NotSupportedError(
                f"`python -m hpc_jobs.devcluster {what}` must run as root, because it installs "
                "packages and starts system daemons (try: sudo python3 -m hpc_jobs.devcluster "
                f"{what})."
            )

    def missing_packages(self) -> list[str]:
        if not shutil.which("dpkg-query"):
            raise NotSupportedError(
                "The dev cluster needs a Debian or Ubuntu machine (dpkg and apt-get); "
                "this one has no dpkg-query."
            )
        res = _run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *PACKAGES])
        installed = {
            line.split()[0]
            for line in res.stdout.splitlines()
            if len(line.split()) >= 2 and line.split()[1] == "ii"
        }
        return [p for p in PACKAGES if p not in installed]

    def _install_packages(self) -> bool:
        missing = self.missing_packages()
        if not missing:
            return False
        if not shutil.which("apt-get"):
            raise NotSupportedError(
                f"The dev cluster needs apt-get to install {' '.join(missing)}, and this machine "
                "has no apt-get."
            )
        self._echo(f"installing {' '.join(missing)} with apt-get ...")
        self.layout.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.layout.log_dir / "apt.log"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        # Package scripts must not start services: we start our own daemons with our own config.
        made_policy = not POLICY_RC_D.exists()
        if made_policy:
            POLICY_RC_D.write_text(
                "#!/bin/sh\n# hpc_jobs.devcluster: no service starts during install\nexit 101\n")
            POLICY_RC_D.chmod(0o755)
        try:
            with open(log, "a") as f:
                rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f).returncode
                if rc != 0:  # stale package lists on a fresh machine: refresh once and retry
                    subprocess.run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL,
                                   stdout=f, stderr=f)
                    rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f).returncode
        finally:
            if made_policy:
                POLICY_RC_D.unlink(missing_ok=True)
        if rc != 0:
            raise DevClusterError(f"apt-get install failed (exit {rc}); see {log}:\n{_tail(log)}")
        return True

    def _is_ours(self, path: Path) -> bool:
        try:
            with open(path) as f:
                return f.readline().rstrip("\n") == C.MARKER
        except OSError:
            return False

    def _check_foreign_config(self) -> None:
        for path in self.layout.conf_files:
            if path.exists() and not self._is_ours(path):
                raise NotSupportedError(
                    f"{path} exists and was not written by hpc_jobs.devcluster; move it away "
                    "first (this machine seems to have its own Slurm configuration)."
                )

    def _prepare_host(self) -> list[str]:
        actions = []
        L = self.layout
        munge, mysql = pwd.getpwnam("munge"), pwd.getpwnam("mysql")
        for d in (L.state_dir, L.run_dir, L.log_dir, L.spool_dir, L.slurmctld_state(),
                  *(L.slurmd_spool(n) for n in C.NODES)):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(L.state_dir, 0o755)
        # Readable by all, so that `status` works without root; the key itself is 0400.
        for d, user, mode in ((L.munge_dir, munge, 0o755), (MUNGE_RUN_DIR, munge, 0o755),
                              (L.mariadb_dir, mysql, 0o755)):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
            os.chmod(d, mode)

        if not L.munge_key.exists():
            L.munge_key.write_bytes(secrets.token_bytes(1024))
            actions.append(f"created munge key {L.munge_key}")
        os.chown(L.munge_key, munge.pw_uid, munge.pw_gid)
        os.chmod(L.munge_key, 0o400)

        hosts = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
        known = {name for line in hosts.splitlines() for name in line.split("#")[0].split()[1:]}
        missing = [n for n in C.NODES if n not in known]
        if missing:
            sep = "" if hosts.endswith("\n") or not hosts else "\n"
            with open(HOSTS_FILE, "a") as f:
                f.write(f"{sep}127.0.0.1 {' '.join(missing)}  {HOSTS_TAG}\n")
            actions.append(f"added {' '.join(missing)} to {HOSTS_FILE}")

        for dev in C.FAKE_GPU_DEVICES:
            p = Path(dev)
            if p.exists() and stat.S_ISCHR(p.stat().st_mode):
                continue
            if p.exists():
                p.unlink()
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
            os.chmod(dev, 0o666)
            actions.append(f"created fake GPU device {dev}")
        return actions

    def _db_password(self) -> str:
        f = self.layout.db_password_file
        if not f.exists():
            _write_if_changed(f, secrets.token_hex(16) + "\n", 0o600)
        return f.read_text().strip()

    def _write_config(self) -> list[Path]:
        L = self.layout
        files = [
            (L.slurm_conf, C.render_slurm_conf(L), 0o644),
            (L.gres_conf, C.render_gres_conf(L), 0o644),
            (L.slurmdbd_conf, C.render_slurmdbd_conf(L, self._db_password()), 0o600),
            (L.oci_conf, C.render_oci_conf(L, _system_python3()), 0o644),
            (L.oci_task_wrapper, C.OCI_TASK_WRAPPER, 0o755),
        ]
        return [path for path, text, mode in files if _write_if_changed(path, text, mode)]

    def _build_oci_bundle(self) -> list[str]:
        """An OCI bundle from this host's files, for `srun --container`: a rootfs of empty mount
        points and symlinks, a config.json that binds the host's /usr, /etc, /tmp and the Python
        environment that ran `up` (no registry, nothing copied: ~1 ms). Idempotent."""
        import sys

        L = self.layout
        rootfs = L.oci_bundle / "rootfs"
        prefixes = tuple(sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}))
        binds = C.oci_bundle_binds(prefixes)
        made = False
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged /usr: the host's symlinks
            host, link = Path("/") / name, rootfs / name
            if host.is_symlink() and not link.is_symlink():
                rootfs.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.readlink(host))
                made = True
        for path in ["/proc", "/root", "/run", "/var/tmp", *(p for p, _ in binds)]:
            point = rootfs / path.lstrip("/")
            if not point.is_dir():
                point.mkdir(parents=True, exist_ok=True)
                made = True
        wrote = _write_if_changed(L.oci_bundle / "config.json", C.render_oci_bundle_config(binds), 0o644)
        os.chmod(L.oci_bundle, 0o755)
        return [f"built the OCI bundle {L.oci_bundle}"] if (made or wrote) else []

    def _restarts_for(self, changed: list[Path]) -> set[str]:
        """Running daemons that must restart to read configuration files that just changed."""
        L = self.layout
        names: set[str] = set()
        if L.slurmdbd_conf in changed:
            names.add("slurmdbd")
        if L.slurm_conf in changed or L.gres_conf in changed:
            names |= {"slurmctld", *(f"slurmd {n}" for n in C.NODES)}
        return names

    # ------------------------------------------------------------------------------- daemons
    def _start_daemons(self, restart: set[str]) -> list[str]:
        actions = []
        for d in self.daemons():
            pid = d.pid()
            if pid and d.name in restart:
                stop_pid(pid, term_timeout=30.0)
                actions.append(f"stopped {d.name} (pid {pid}) to reload its configuration")
                pid = None
            if pid:
                continue
            if read_pid(d.pid_file) is not None:
                actions.append(f"removed stale pid file {d.pid_file}")
                d.pid_file.unlink()
            getattr(self, "_start_" + d.program)(d)
            actions.append(f"started {d.name} (pid {d.pid()})")
        return actions

    def _launch(self, d: Daemon, argv: list[str], extra_env: dict[str, str] | None = None,
                **kw) -> None:
        """Run a daemon's start command; it forks into the background itself (or via setsid)."""
        suffix = f"-{d.required_args[-1]}" if d.required_args else ""  # slurmd-n1
        out = self.layout.log_dir / f"{d.program}{suffix}.stderr"
        out.parent.mkdir(parents=True, exist_ok=True)
        if d.pid() is None:  # a pid file left by a daemon of an earlier boot would read as "died"
            d.pid_file.unlink(missing_ok=True)
        with open(out, "w") as f:
            if "user" in kw:
                os.chown(out, pwd.getpwnam(kw["user"]).pw_uid, -1)
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, cwd="/",
                                env={**_clean_env(), **(extra_env or {})}, **kw).returncode
        if rc != 0:
            raise DevClusterError(
                f"{d.name} failed to start (exit {rc}): {' '.join(argv)}\n{_tail(out)}\n{_tail(d.log_file)}"
            )
        self._wait(lambda: d.pid() is not None, f"{d.name} to write {d.pid_file}", d, out)

    def _wait(self, ready: Callable[[], bool], what: str, d: Daemon | None = None,
              extra_log: Path | None = None, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while not ready():
            if time.monotonic() > deadline:
                logs = "".join(f"\n--- {p}\n{_tail(p)}" for p in (extra_log, d and d.log_file) if p)
                raise DevClusterError(f"timed out waiting for {what}{logs}")
            if d is not None and d.pid() is None and read_pid(d.pid_file) is not None:
                logs = "".join(f"\n--- {p}\n{_tail(p)}" for p in (extra_log, d.log_file) if p)
                raise DevClusterError(f"{d.name} died while starting{logs}")
            time.sleep(0.1)

    def _start_munged(self, d: Daemon) -> None:
        L = self.layout
        self._launch(d, [
            "/usr/sbin/munged", f"--key-file={L.munge_key}", f"--pid-file={d.pid_file}",
            f"--log-file={d.log_file}", f"--seed-file={L.munge_dir / 'munged.seed'}",
        ], user="munge", group="munge", extra_groups=[])
        self._wait(lambda: _run(["munge", "-n"]).returncode == 0, "munged to answer", d)

    def _mariadb_client(self, prog: str) -> list[str]:
        return [prog, "--no-defaults", f"--socket={self.layout.mariadb_socket}", "-uroot"]

    def _start_mariadbd(self, d: Daemon) -> None:
        L = self.layout
        if not (L.mariadb_datadir / "mysql").is_dir():
            self._echo(f"initialising the accounting database in {L.mariadb_datadir} ...")
            res = _run(["mariadb-install-db", "--no-defaults", "--user=mysql",
                        f"--datadir={L.mariadb_datadir}", "--auth-root-authentication-method=socket",
                        "--skip-test-db"], cwd="/")
            if res.returncode != 0:
                raise DevClusterError(f"mariadb-install-db failed:\n{res.stdout}\n{res.stderr}")
        # mariadbd stays in the foreground; setsid --fork detaches it from us.
        self._launch(d, [
            "setsid", "--fork", "/usr/sbin/mariadbd", "--no-defaults", "--user=mysql",
            f"--datadir={L.mariadb_datadir}", f"--socket={L.mariadb_socket}",
            f"--pid-file={d.pid_file}", f"--log-error={d.log_file}", "--bind-address=127.0.0.1",
            f"--port={C.MARIADB_PORT}", "--skip-name-resolve", "--innodb-buffer-pool-size=64M",
        ], extra_env={"UMASK": "0644"})  # a pid file that `status` can read without root
        ping = self._mariadb_client("mariadb-admin") + ["ping"]
        self._wait(lambda: _run(ping).returncode == 0, "mariadbd to answer", d)
        pw = self._db_password()
        sql = "".join(
            f"CREATE USER IF NOT EXISTS '{C.DB_USER}'@'{host}';"
            f"ALTER USER '{C.DB_USER}'@'{host}' IDENTIFIED BY '{pw}';"
            f"GRANT ALL ON {C.DB_NAME}.* TO '{C.DB_USER}'@'{host}';"
            for host in ("localhost", "127.0.0.1")
        )
        res = _run(self._mariadb_client("mariadb") + ["-e", sql])
        if res.returncode != 0:
            raise DevClusterError(f"could not create the database user {C.DB_USER}: {res.stderr}")

    def _start_slurmdbd(self, d: Daemon) -> None:
        self._launch(d, ["/usr/sbin/slurmdbd"])
        self._wait(lambda: _port_open(C.SLURMDBD_PORT), "slurmdbd to listen", d)

    def _start_slurmctld(self, d: Daemon) -> None:
        self._launch(d, ["/usr/sbin/slurmctld"])
        self._wait(lambda: _port_open(C.SLURMCTLD_PORT), "slurmctld to listen", d)

    def _start_slurmd(self, d: Daemon) -> None:
        node = d.required_args[-1]
        self._launch(d, ["/usr/sbin/slurmd", "-N", node])
        self._wait(lambda: _port_open(C.NODE_PORTS[node]), f"{d.name} to listen", d)

    # ------------------------------------------------------------------------ readiness checks
    def _node_states(self) -> dict[str, str]:
        res = _run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
        if res.returncode != 0:
            return {}
        states = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1].lower()
        return states

    def _wait_nodes_usable(self, idle: bool = False) -> list[str]:
        """Wait until n1 and n2 are usable (``idle``: idle, running nothing); resume nodes left
        drained (e.g. by an older config)."""
        actions = []
        resumed: dict[str, float] = {}
        deadline = time.monotonic() + self.timeout
        wanted = {"idle"} if idle else USABLE_NODE_STATES
        while True:
            states = self._node_states()
            if all(states.get(n) in wanted for n in C.NODES):
                return actions
            now = time.monotonic()
            for node in C.NODES:
                state = states.get(node, "")
                stuck = "drain" in state or (state.startswith("down") and not state.endswith("*"))
                if stuck and now - resumed.get(node, 0) > 3:
                    res = _run(["scontrol", "update", f"nodename={node}", "state=resume"])
                    resumed[node] = now
                    actions.append(f"resumed node {node} (was {state})"
                                   + ("" if res.returncode == 0 else f": {res.stderr.strip()}"))
            if now > deadline:
                logs = "".join(f"\n--- {d.log_file}\n{_tail(d.log_file)}"
                               for d in self.daemons() if d.program in ("slurmd", "slurmctld"))
                raise DevClusterError(f"timed out waiting for nodes to be idle: {states}{logs}")
            time.sleep(0.2)

    def _wait_accounting(self) -> None:
        def answers() -> bool:
            clusters = _run(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], timeout=15)
            return (clusters.returncode == 0 and C.CLUSTER_NAME in clusters.stdout.split()
                    and _run(["sacct", "-n", "-X"], timeout=15).returncode == 0)

        self._wait(answers, "sacct to answer (slurmdbd, cluster registered)", self._daemon("slurmdbd"))

    def _cancel_all_jobs(self) -> list[str]:
        if self._daemon("slurmctld").pid() is None:
            return []
        res = _run(["squeue", "-h", "-o", "%A"], timeout=15)
        jobs = res.stdout.split() if res.returncode == 0 else []
        if not jobs:
            return []
        _run(["scancel", *jobs], timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = _run(["squeue", "-h", "-t", "PD,R,CG,S,CF,RQ,RS,RF,SO", "-o", "%A"], timeout=15)
            if left.returncode != 0 or not left.stdout.split():
                break
            time.sleep(0.2)
        return [f"cancelled {len(jobs)} job(s)"]
