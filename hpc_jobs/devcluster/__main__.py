"""``python -m hpc_jobs.devcluster up|down|status``.

Exit codes: 0 success (for ``status``: the cluster is up), 1 failure (for ``status``: not up),
2 this machine cannot host the cluster (not root, not Debian/Ubuntu...).
"""

from __future__ import annotations

import argparse
import signal
import sys

from .cluster import DevCluster, DevClusterError, NotSupportedError
from .config import STATE_DIR_ENV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpc_jobs.devcluster",
        description="A one-host Slurm cluster (nodes n1, n2 with fake GPUs) for development and CI.",
    )
    parser.add_argument("--state-dir", help=f"where state lives (default: ${STATE_DIR_ENV} or "
                        "/var/lib/hpc_jobs_devcluster)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="install Slurm if missing, start the cluster, wait until it is idle")
    up.add_argument("--cancel-jobs", action="store_true",
                    help="cancel every job slurmctld recovered from its saved state (e.g. the jobs "
                    "of a test run that was killed), so that the nodes start empty")
    down = sub.add_parser("down", help="stop every daemon it started")
    down.add_argument("--purge", action="store_true",
                      help="also wipe state, spool directories and the accounting database")
    st = sub.add_parser("status", help="report each daemon and sinfo; exit 0 only if up")
    st.add_argument("-q", "--quiet", action="store_true", help="print nothing, only the exit code")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... status | head` exits quietly

    cluster = DevCluster(state_dir=args.state_dir)
    try:
        if args.command == "up":
            cluster.up(cancel_jobs=args.cancel_jobs)
        elif args.command == "down":
            cluster.down(purge=args.purge)
        else:
            status = cluster.status()
            if not args.quiet:
                print(status)
            return 0 if status.up else 1
    except NotSupportedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DevClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
