"""An entry-point workflow from another package, launched on the dev cluster from a built wheel.

The wheel of this checkout and docs/examples/plugin are installed in a fresh venv (no torch, no
checkout on sys.path; the fixture of tests/unit/test_package.py); `hpc-jobs charcount` is found by
its entry point and its array and merge run as Slurm jobs with that venv's python.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.unit.test_package import REPO, _run, pkg  # noqa: F401  (pkg: the wheel in a fresh venv)


def test_entry_point_workflow_runs_on_the_dev_cluster(slurm_cluster, pkg):  # noqa: F811
    plugin = pkg.root / "plugin-dc"
    shutil.copytree(REPO / "docs" / "examples" / "plugin", plugin,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([pkg.py, "-m", "pip", "install", "-q", "--no-deps", plugin], pkg.root, env=pkg.env)
    out = pkg.hpc("charcount", "--cluster", "devcluster", "--run-name", "ep-dc", "--follow").stdout
    assert "merge=COMPLETED" in out, out
    doc = json.loads(pkg.hpc("status", "ep-dc", "--json").stdout)
    stages = {s["name"]: s for s in doc["stages"]}
    assert stages["merge"]["state"] == "COMPLETED" and stages["merge"]["job_ids"], stages["merge"]
    run = Path(pkg.env["HPC_JOBS_HOME"]) / "runs" / "charcount" / "ep-dc"
    assert (run / "code" / "hpc_jobs_example_plugin" / "charcount.py").exists()
