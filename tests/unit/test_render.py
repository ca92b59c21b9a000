"""Rendering: golden scripts per profile, quoting, and validation of every user value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_jobs import profiles, render
from hpc_jobs.errors import UserError
from hpc_jobs.render import Dependency, build_job
from hpc_jobs.spec import Resources, Stage
from launchers import demo

GOLDEN = Path(__file__).parent / "golden"
RUN_DIR = Path("/scratch1/ttrojan/hpc_jobs/runs/demo/golden-run")


def _render(profile_name, stage, **kw):
    profile = profiles.load(profile_name)
    job = build_job(
        stage, profile, workflow="demo", run_id="golden-run", run_dir=kw.pop("run_dir", RUN_DIR),
        launch_python="/opt/venv/bin/python", **kw,
    )
    return render.render(job)


def _gpu_stage(gpus=2, nodes=1):
    return Stage("train", demo.train, resources=Resources(nodes=nodes, gpus_per_node=gpus, cpus_per_task=8,
                                                          mem="32GB", time="02:00:00"))


def _container_stage(runtime, image, nodes=1, gpus=2):
    from hpc_jobs.container import Container

    return Stage("train", demo.train, resources=Resources(nodes=nodes, gpus_per_node=gpus, cpus_per_task=8, mem="32GB",
                                                          time="02:00:00"),
                 container=Container(runtime=runtime, image=image, binds=["/project/ttrojan_123:/project:ro"],
                                     env={"HF_HOME": "/scratch1/ttrojan/hf"}))


CASES = {
    "discovery_train": ("discovery", lambda: _gpu_stage(), dict(account="ttrojan_123", dependencies=[Dependency("afterok", ["101"])])),
    "discovery_shard_array": ("discovery", lambda: Stage("shard", demo.shard, array=3, array_parallelism=2), dict(account="ttrojan_123", array="0-2%2")),
    "devcluster_train_2nodes": ("devcluster", lambda: _gpu_stage(2, 2), dict(dependencies=[Dependency("afterok", ["7", "8"]), Dependency("aftercorr", ["9"])])),
    # containers: the image paths are the cluster's, not this machine's (the image check is off below)
    "discovery_apptainer_train": ("discovery", lambda: _container_stage("apptainer", "/scratch1/ttrojan/images/sensorium.sif"), dict(account="ttrojan_123")),
    "generic_pyxis_train_2nodes": ("generic", lambda: _container_stage("pyxis", "nvcr.io#nvidia/pytorch:24.01-py3", nodes=2, gpus=4), {}),
    "devcluster_oci_train_2nodes": ("devcluster", lambda: _container_stage("oci", "/var/lib/hpc_jobs_devcluster/oci-bundle", nodes=2, gpus=1), {}),
    "generic_cpu": ("generic", lambda: Stage("prepare", demo.fetch, resources=Resources(cpus_per_task=8, mem="32G", time="12:00:00")), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_scripts(case, monkeypatch):
    monkeypatch.setenv("USER", "ttrojan")
    monkeypatch.setenv("HPC_JOBS_HOME", "/home/ttrojan/hpc_jobs")
    monkeypatch.setattr(render.shutil, "which", lambda name: None)  # a dry run away from the cluster
    profile, make_stage, kw = CASES[case]
    text = _render(profile, make_stage(), **kw)
    golden = GOLDEN / f"{case}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"rendering changed; inspect and rerun with UPDATE_GOLDEN=1: {golden}"


def test_carc_script_reads_like_the_seed():
    text = _render("discovery", _gpu_stage(), account="ttrojan_123")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gres=gpu:v100:2", "#SBATCH --account=ttrojan_123",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32768M", "#SBATCH --time=02:00:00",
                 "module load gcc/8.3.0 cuda/10.2.89", "conda activate", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --job-name=demo.train"):
        assert line in text, line


def test_script_is_valid_bash():
    text = _render("discovery", _gpu_stage(), account="acct")
    proc = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("bad", ["gpu\n#SBATCH --wrap=rm", "gpu;rm -rf ~", "$(reboot)", "a b", "x'y"])
def test_injection_in_directive_values_is_refused(bad):
    stage = Stage("train", demo.train, resources=Resources(partition=bad))
    with pytest.raises(UserError, match="characters Slurm does not accept"):
        _render("generic", stage)
    with pytest.raises(UserError):
        _render("generic", _gpu_stage(), account=bad)


def test_run_dir_with_shell_characters_is_refused():
    with pytest.raises(UserError, match="run directory"):
        _render("generic", _gpu_stage(), run_dir=Path("/tmp/x;touch /tmp/pwned"))


def test_rendering_is_pure():
    a = _render("devcluster", _gpu_stage())
    b = _render("devcluster", _gpu_stage())
    assert a == b


def test_gres_without_type_and_with_type():
    generic = profiles.load("generic")
    assert generic.gres_for(2, None) == "gpu:2"
    assert generic.gres_for(2, "a100") == "gpu:a100:2"
    disc = profiles.load("discovery")
    assert disc.gres_for(4, None) == "gpu:v100:4"
    assert disc.gres_for(0, None) is None


def test_launch_path_imports_no_torch(tmp_path):
    """Building, rendering and dry-running a pipeline must not import torch (launching is instant)."""
    code = (
        "import sys, os\n"
        "from hpc_jobs.cli import main\n"
        "rc = main(['demo', '--cluster', 'discovery', '--account', 'a', '--dry-run', '--json'])\n"
        "assert rc == 0, rc\n"
        "heavy = [m for m in ('torch', 'numpy', 'submitit', 'cv2', 'timm') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    env = dict(os.environ, HPC_JOBS_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_the_compiled_template_is_kept_per_user_and_a_damaged_copy_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path))
    monkeypatch.setattr(render, "_ENV", None)
    text = _render("generic", _gpu_stage())
    folder = tmp_path / "cache" / "templates"
    cached = list(folder.iterdir())
    assert len(cached) == 1 and (folder.stat().st_mode & 0o777) == 0o700
    cached[0].write_bytes(b"not bytecode")
    monkeypatch.setattr(render, "_ENV", None)  # a new process
    assert _render("generic", _gpu_stage()) == text
    assert cached[0].read_bytes() != b"not bytecode"  # compiled and written again


def test_no_writable_home_renders_without_the_cache(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path))
    monkeypatch.setattr(render, "_ENV", None)
    assert "#SBATCH --gres" in _render("generic", _gpu_stage())
