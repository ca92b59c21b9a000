"""Every ``bash`` block of the docs runs as written, so the docs cannot rot.

Blocks fenced as ``bash`` are executed (in the repository root, with a fresh HPC_JOBS_HOME; the dev
cluster is up); blocks fenced as ``sh`` are shown to readers but need something this machine
lacks (a real university cluster) or are what CI itself runs (the install, ``.ci/run``). Profile
examples fenced as ``yaml`` must load as profiles.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from .conftest import JOBS_ROOT

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(kind: str):
    for path in DOCS:
        for i, match in enumerate(FENCE.finditer(path.read_text())):
            if match.group(1) == kind:
                yield pytest.param(path, match.group(2), id=f"{path.name}:{i}")


@pytest.mark.parametrize("path,script", list(blocks("bash")))
def test_bash_block_runs(slurm_cluster, path, script):
    home = JOBS_ROOT / f"docs-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    env = dict(os.environ, HPC_JOBS_HOME=str(home))
    env.pop("HPC_JOBS_LAUNCHERS", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{path.name} block failed:\n{script}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("path,text", list(blocks("yaml")))
def test_yaml_profile_examples_load(path, text):
    import yaml

    from hpc_jobs.profiles import _from_mapping

    data = yaml.safe_load(text)
    profile = _from_mapping({"name": "example", **data}, f"{path.name} example")
    assert profile.backend in ("slurm", "local")


def test_docs_link_to_files_that_exist():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
