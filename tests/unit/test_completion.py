"""Shell completion: the candidates for each position come from the registry, the run index, a
run's record, the profiles and a workflow's config, and the bash script offers them in real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_jobs.completion import BASH, candidates
from tests.pipeline_helpers import cli


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("completion")
    cli(home, "demo", "--cluster", "local", "--run-name", "first-demo")
    return home


@pytest.fixture
def with_home(home, monkeypatch):
    monkeypatch.setenv("HPC_JOBS_HOME", str(home))
    return home


def test_first_word_is_a_command_or_a_workflow(with_home):
    assert {"status", "logs", "resume", "diving", "isc", "vsc", "product", "sensorium", "demo"} <= set(candidates([""]))
    assert candidates(["st"]) == ["status"]
    assert candidates(["d"]) == ["debug", "demo", "diving"]
    assert candidates(["--v"]) == ["--version"]


def test_runs_then_their_stages(with_home):
    assert candidates(["status", "fir"]) == ["first-demo"]
    assert "last" in candidates(["resume", ""])
    assert candidates(["logs", "first-demo", "train"]) == ["train", "train_more"]
    assert candidates(["status", "no-such-run", ""]) == []  # an unknown run offers nothing, raises nothing
    assert candidates(["report", "first-demo", ""]) == []  # report takes one run, no stage


def test_launch_options_config_keys_profiles_and_presets(with_home):
    assert {"--gpus", "--cluster", "--set", "--sweep", "--dry-run"} <= set(candidates(["diving", "--"]))
    assert candidates(["diving", "--set", "learning_"]) == ["learning_rate="]
    assert candidates(["diving", "--sweep", "batch"]) == ["batch_size="]
    assert candidates(["diving", "--set", "learning_rate=1"]) == []  # a value: nothing to offer
    assert {"local", "devcluster", "discovery", "auto"} <= set(candidates(["isc", "--cluster", ""]))
    assert "tiny" in candidates(["diving", "--preset", ""])
    assert candidates(["debug", "sen"]) == ["sensorium"]
    assert candidates(["no-such-workflow", "--"]) == []


def test_the_bash_script_completes_in_bash(with_home, tmp_path):
    bash = shutil.which("bash")
    exe = Path(sys.executable).parent / "hpc-jobs"
    if bash is None or not exe.exists():
        pytest.fail(f"needs bash and the installed hpc-jobs command next to {sys.executable}")
    script = tmp_path / "complete.sh"
    script.write_text(BASH + '\nCOMP_WORDS=(hpc-jobs logs first-demo tr); COMP_CWORD=3; _hpc_jobs_complete\n'
                      'printf "%s\\n" "${COMPREPLY[@]}"\n'
                      'COMP_WORDS=(hpc-jobs diving --set epo); COMP_CWORD=3; _hpc_jobs_complete\n'
                      'printf "%s\\n" "${COMPREPLY[@]}"\n')
    env = dict(os.environ, PATH=f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([bash, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["train", "train_more", "epochs="], out.stdout
