"""Fixtures for tests that submit real jobs to the dev Slurm cluster.

Start the cluster first: ``sudo python -m hpc_jobs.devcluster up`` (``.ci/run`` does it). When it
is not up, every test that uses ``slurm_cluster`` FAILS with that instruction; none is skipped.
Every test collected under tests/integration gets the ``slurm`` marker (for selection only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

NODES = ("n1", "n2")
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "TIMEOUT",
}  # PREEMPTED is not final here: the cluster requeues preempted jobs
SACCT_FIELDS = ("JobID", "JobName", "Partition", "State", "ExitCode", "Start", "End", "NodeList")
JOBS_ROOT = Path("/tmp/hpc_jobs_it")  # every node is this host, so /tmp is shared storage
START_HINT = "Start it with: sudo python -m hpc_jobs.devcluster up"

_HERE = Path(__file__).resolve().parent

# Status polls back off to one scheduler call per 30 s by default; the tests wait on states, so
# let the shared poller look every 5 s at most.
os.environ.setdefault("HPC_JOBS_POLL_MAX_S", "5")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def sacct(job_id: str | int, duplicates: bool = False) -> list[dict[str, str]]:
    """sacct's allocation records (-X) for a job: one dict per record. ``duplicates`` also returns
    the records of earlier runs of a requeued job, oldest first."""
    argv = ["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", ",".join(SACCT_FIELDS)]
    if duplicates:
        argv.append("-D")
    res = run(*argv)
    if res.returncode != 0:
        return []
    rows = [dict(zip(SACCT_FIELDS, line.split("|"))) for line in res.stdout.splitlines() if line]
    for r in rows:
        r["State"] = r["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return rows


def wait_final(job_id: str | int, timeout: float = 120.0, poll: float = 0.25,
               fields: tuple[str, ...] = ("Partition",)) -> dict[str, str]:
    """Wait until sacct reports a final state for ``job_id``; return its sacct record.

    ``fields``: also wait until these fields are filled in. A job's record in sacct can show its
    final state up to ~4 s before the rest of it arrives: until then Partition is empty and
    NodeList names only the first node. An empty Partition marks such a partial record.
    Fails the test (with the last record and squeue's view) when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        last = sacct(job_id)
        if (last and last[-1]["State"] in FINAL_STATES
                and last[-1]["End"] not in ("", "Unknown")
                and all(last[-1][f] for f in fields)):
            return last[-1]
        time.sleep(poll)
    squeue = run("squeue", "-j", str(job_id), "-o", "%i %P %T %r %N").stdout
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s; sacct: {last}; squeue:\n{squeue}")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def job_state(job_id: str | int) -> str:
    """The job's current state according to slurmctld (squeue), '' if unknown."""
    res = run("squeue", "-h", "-j", str(job_id), "-t", "all", "-o", "%T")
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""


@dataclass(frozen=True)
class SlurmCluster:
    nodes: tuple[str, ...]
    node_states: dict[str, str]

    sacct = staticmethod(sacct)
    wait_final = staticmethod(wait_final)
    wait_for = staticmethod(wait_for)
    job_state = staticmethod(job_state)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The dev cluster, checked once per session: sinfo shows n1 and n2 usable, sacct answers."""
    if shutil.which("sinfo") is None:
        pytest.fail(f"The dev Slurm cluster is not installed (no `sinfo` on PATH). {START_HINT}",
                    pytrace=False)
    res = run("sinfo", "-h", "-N", "-o", "%N %T")
    if res.returncode != 0:
        pytest.fail(f"The dev Slurm cluster is not up (sinfo: {res.stderr.strip()}). {START_HINT}",
                    pytrace=False)
    states = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
    bad = {n: states.get(n, "missing") for n in NODES
           if states.get(n) not in ("idle", "mixed", "allocated", "completing")}
    if bad:
        pytest.fail(f"The dev Slurm cluster's nodes are not usable: {bad}. {START_HINT}",
                    pytrace=False)
    acct = run("sacct", "-n", "-X")
    if acct.returncode != 0:
        pytest.fail(f"sacct does not answer ({acct.stderr.strip()}): accounting is down. "
                    f"{START_HINT}", pytrace=False)
    return SlurmCluster(NODES, states)


@pytest.fixture
def job_dir(request) -> Path:
    """A fresh directory under /tmp for this test's submitit folders and job files; kept when the
    test fails (for its logs), removed otherwise."""
    JOBS_ROOT.mkdir(mode=0o777, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=JOBS_ROOT))
    os.chmod(path, 0o777)
    yield path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.passed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def job_name(request) -> str:
    """A Slurm job name unique to this test; its jobs still queued at teardown are cancelled so
    that they cannot hold the nodes for the next test."""
    name = f"it-{request.node.name[:30]}-{uuid.uuid4().hex[:6]}"
    yield name
    run("scancel", "--name", name)
