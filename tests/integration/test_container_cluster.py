"""Stages in containers on the real dev cluster (docs/containers.md).

* Slurm's own OCI support, for real: ``python -m hpc_jobs.devcluster up`` writes /etc/slurm/oci.conf
  (runc) and an OCI bundle made of this host's files. The test-only ``faultlab`` workflow runs with
  a profile whose ``container`` is that bundle: ``prepare`` (a CPU stage), ``train`` as 2-rank DDP
  across the two nodes (gloo), requeued with ``scancel --signal=USR2`` mid-training (the requeue goes
  through hpc-jobs' scontrol relay inside the container) and resumed. Each train
  rank is checked to run in another mount namespace than this shell; ``debug`` runs a stage in the
  same container under salloc.
* Apptainer and Pyxis are not packaged for Debian: their command lines are checked by recording
  stand-ins on PATH (``apptainer``, and an ``srun`` that takes Pyxis's ``--container-*`` options)
  that assert the arguments, record them and run the command on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.pipeline_helpers import REPO, cli, launch_json, status_json, wait_run

from .conftest import JOBS_ROOT, wait_for

LAUNCHERS = "tests.workflows"
BUNDLE = Path("/var/lib/hpc_jobs_devcluster/oci-bundle")
OCI_CONF = Path("/etc/slurm/oci.conf")
FIGURES = JOBS_ROOT / "container-figures.json"


@pytest.fixture(scope="module")
def home() -> Path:
    path = JOBS_ROOT / f"containers-{uuid.uuid4().hex[:8]}"
    (path / "config" / "hpc_jobs" / "profiles").mkdir(parents=True)
    return path


def _profile(home: Path, name: str, container: Dict[str, Any]) -> str:
    """A copy of the devcluster profile with a ``container`` setting, in this test's own config dir."""
    import yaml

    data = yaml.safe_load((REPO / "templates" / "profiles" / "devcluster.yaml").read_text())
    data.pop("detect", None)
    data["container"] = container
    (home / "config" / "hpc_jobs" / "profiles" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return name


@pytest.fixture(scope="module", autouse=True)
def _env(home):
    settings = {"HPC_JOBS_LAUNCHERS": LAUNCHERS, "HPC_JOBS_POLL_MAX_S": "2",
                "XDG_CONFIG_HOME": str(home / "config")}
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def oci_profile(home, slurm_cluster) -> str:
    if not (BUNDLE / "config.json").is_file() or not OCI_CONF.is_file() or not shutil.which("runc"):
        pytest.fail(f"the dev cluster has no OCI support ({BUNDLE}/config.json, {OCI_CONF}, runc): run "
                    "python -m hpc_jobs.devcluster up (it writes them)", pytrace=False)
    return _profile(home, "devcluster-oci", {"runtime": "oci", "image": str(BUNDLE), "python": "{launch_python}",
                                             "env": {"HPC_JOBS_IT_CONTAINER": "oci"}})


def _record(name: str, value: float) -> None:
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures[name] = round(value, 1)
    FIGURES.write_text(json.dumps(figures, indent=1))
    print(f"[containers] {name}: {value:.1f} s")


def _trail(run_dir: Path) -> List[Dict[str, Any]]:
    path = run_dir / "stages" / "train" / "trail.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _mount_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


# ------------------------------------------------------------------- Slurm's OCI support, for real
def test_oci_stage_ddp_requeue_and_resume(home, oci_profile, standin_runs, slurm_cluster):
    # standin_runs: the Apptainer and Pyxis stand-in runs are launched first and run meanwhile
    t0 = time.time()
    out = launch_json(home, "faultlab", "--cluster", oci_profile, "--run-name", "oci", "--nodes", "2",
                      "--gpus", "1", "--set", "step_sleep_s=0.15", "--set", "epochs=2",
                      "--set", "downstream=false")
    run_dir = Path(out["run_dir"])
    train = run_dir / "stages" / "train"
    script = (train / "job.sbatch").read_text()
    assert f"--container={train}/oci" in script and "#SBATCH --nodes=2" in script, script

    # both ranks train, each on its own node, each inside the container (another mount namespace)
    ranks = wait_for(lambda: len(list((train / "ranks").glob("rank*.json"))) == 2
                     and [json.loads(p.read_text()) for p in sorted((train / "ranks").glob("rank*.json"))],
                     timeout=120, what="both train ranks to start")
    wait_for(lambda: any(r["event"] == "first_step" for r in _trail(run_dir)), 60, "the first training step")
    assert {r["node"] for r in ranks} == {"n1", "n2"}, ranks
    host_ns = _mount_ns(os.getpid())
    for rank in ranks:
        assert _mount_ns(rank["pid"]) != host_ns, f"rank {rank} runs in the host's mount namespace"
    prepare_s = status_json(home, "oci")["prepare"]
    config = json.loads((train / "oci" / "config.json").read_text())
    destinations = {m["destination"] for m in config["mounts"]}
    assert {str(run_dir), str(home / "data")} <= destinations, destinations
    assert "HPC_JOBS_IT_CONTAINER=oci" in config["process"]["env"] and config["process"]["cwd"] == str(run_dir)

    # requeue mid-training: USR2 -> checkpoint -> the relay's request -> scontrol requeue on the host
    job_id = out["stages"][[s["name"] for s in out["stages"]].index("train")]["job_ids"][0]
    signalled = time.time()
    res = subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    restart = wait_for(lambda: next((r for r in _trail(run_dir) if r["event"] == "start" and r["restart"] >= 1), None),
                       timeout=120, what="the requeued train stage to start again")
    _record("oci requeue round trip (USR2 -> training again)", restart["time"] - signalled)
    assert restart["from_step"] > 0, f"the requeued stage did not resume from a checkpoint: {restart}"
    assert not list(train.glob(".requeue.*")), "the relay's request was not consumed"

    states = wait_run(home, "oci", timeout=300)
    assert {k: v["state"] for k, v in states.items()} == {"prepare": "COMPLETED", "train": "COMPLETED"}, states
    causes = [i["cause"] for i in states["train"].get("interruptions", [])]
    assert causes == ["REQUEUED"], states["train"]
    assert (train / ".container_bin" / "scontrol").is_file()  # the relay, written inside the container
    _record("oci pipeline (prepare, 2-node DDP train with one requeue)", time.time() - t0)
    print(f"[containers] prepare stage: {prepare_s.get('elapsed')}")

    logs = cli(home, "logs", "oci", "train")
    assert "Starting with JobEnvironment" in logs.stdout + logs.stderr


def test_oci_debug_runs_the_stage_in_the_same_container(home, oci_profile, slurm_cluster):
    proc = cli(home, "debug", "faultlab", "--stage", "prepare", "--cluster", oci_profile, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    debug_runs = sorted((home / "runs" / "faultlab").glob("debug-prepare-*"))
    assert debug_runs, proc.stdout
    stage_dir = debug_runs[-1] / "stages" / "prepare"
    text = (stage_dir / "debug.sh").read_text()
    assert f"--container={stage_dir}/oci" in text and "hpc_jobs.debug inner" in text, text
    assert "scontrol requeue" not in text  # no requeue in an interactive allocation
    assert json.loads((stage_dir / "state.json").read_text())["state"] == "COMPLETED"


# ------------------------------------------------------------- Apptainer and Pyxis: recording stand-ins
APPTAINER = r'''#!PYTHON
"""Recording stand-in for apptainer: checks `apptainer exec` arguments, records them, runs the command."""
import json, os, sys
args = sys.argv[1:]
assert args[0] == "exec", args
i, opts, env = 1, {"bind": []}, {}
while args[i].startswith("--"):
    flag = args[i][2:]
    if flag == "nv":
        opts["nv"] = True; i += 1; continue
    value = args[i + 1]; i += 2
    if flag == "bind":
        src = value.split(":")[0]
        assert os.path.isdir(src), f"bind source {src} does not exist"
        opts["bind"].append(value)
    elif flag == "env":
        key, _, val = value.partition("="); env[key] = val
    elif flag == "pwd":
        opts["pwd"] = value
    else:
        raise SystemExit(f"apptainer stand-in: unexpected option --{flag}")
image, command = args[i], args[i + 1:]
assert os.path.isfile(image), f"image {image} does not exist"
assert command[1:4] == ["-m", "hpc_jobs.container", "enter"], command
with open(os.environ["STANDIN_LOG"], "a") as fh:
    fh.write(json.dumps({"tool": "apptainer", "opts": opts, "env": env, "image": image, "command": command,
                         "rank": os.environ.get("SLURM_PROCID")}) + "\n")
os.environ.update(env)
os.chdir(opts["pwd"])
os.execvp(command[0], command)
'''

SRUN = r'''#!PYTHON
"""Recording stand-in for Pyxis: takes srun's --container-* options, checks and records them, runs the
rest with the real srun."""
import json, os, sys
REAL = "REAL_SRUN"
pyxis, rest = {}, []
for arg in sys.argv[1:]:
    if arg.startswith("--container-") and not rest[-1:] == ["--"]:
        key, _, value = arg[2:].partition("=")
        pyxis[key] = value
    else:
        rest.append(arg)
if pyxis:
    assert pyxis["container-image"], pyxis
    for mount in pyxis["container-mounts"].split(","):
        assert os.path.isdir(mount.split(":")[0]), f"mount source {mount} does not exist"
    assert os.path.isdir(pyxis["container-workdir"]), pyxis
    for name in pyxis["container-env"].split(","):
        assert name in os.environ, f"--container-env names {name}, which is not set"
    with open(os.environ["STANDIN_LOG"], "a") as fh:
        fh.write(json.dumps({"tool": "pyxis", "opts": pyxis, "srun": rest}) + "\n")
os.execv(REAL, [REAL] + rest)
'''


def _standins(home: Path, name: str) -> Dict[str, str]:
    """A bin directory with the stand-ins, first on PATH of the launch (sbatch passes PATH to the job)."""
    bindir = home / f"bin-{name}"
    bindir.mkdir(exist_ok=True)
    for tool, text in (("apptainer", APPTAINER), ("srun", SRUN)):
        path = bindir / tool
        path.write_text(text.replace("PYTHON", sys.executable).replace("REAL_SRUN", shutil.which("srun")))
        path.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "STANDIN_LOG": str(home / f"{name}.jsonl")}


def _launch_with(home: Path, env: Dict[str, str], *args: str) -> Dict[str, Any]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return launch_json(home, *args)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def standin_runs(home, slurm_cluster) -> Dict[str, Dict[str, Any]]:
    """Both stand-in runs, launched together (they share the cluster's two nodes)."""
    image = home / "faultlab.sif"
    image.write_text("not a real image: the stand-in only checks that it exists\n")
    apptainer = _profile(home, "devcluster-apptainer", {
        "runtime": "apptainer", "image": str(image), "binds": [f"{home}:/mnt/home:ro"],
        "env": {"HPC_JOBS_IT_CONTAINER": "apptainer"}, "gpus": True, "python": "{launch_python}"})
    pyxis = _profile(home, "devcluster-pyxis", {
        "runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:24.01-py3", "env": {"HPC_JOBS_IT_CONTAINER": "pyxis"},
        "python": "{launch_python}"})
    runs = {}
    for name, profile, extra in (("apptainer", apptainer, ["--gpus", "2"]), ("pyxis", pyxis, [])):
        env = _standins(home, name)
        out = _launch_with(home, env, "faultlab", "--cluster", profile, "--run-name", name, *extra,
                           "--set", "epochs=1", "--set", "downstream=false")
        runs[name] = {"run_dir": Path(out["run_dir"]), "log": Path(env["STANDIN_LOG"]), "image": image}
    return runs


def test_apptainer_command_line_with_a_recording_standin(home, standin_runs):
    run = standin_runs["apptainer"]
    run_dir, image = run["run_dir"], run["image"]
    states = wait_run(home, "apptainer", timeout=240)
    assert {k: v["state"] for k, v in states.items()} == {"prepare": "COMPLETED", "train": "COMPLETED"}, states
    calls = [json.loads(l) for l in run["log"].read_text().splitlines()]
    assert sorted(c["rank"] for c in calls) == ["0", "0", "1"], calls  # prepare: 1 task; train: 2 ranks
    for call in calls:
        assert call["opts"]["bind"][:2] == [str(run_dir), str(home / "data")], call
        assert f"{home}:/mnt/home:ro" in call["opts"]["bind"] and call["opts"]["pwd"] == str(run_dir)
        assert call["opts"].get("nv") is True and call["env"] == {"HPC_JOBS_IT_CONTAINER": "apptainer"}
        assert call["image"] == str(image) and call["command"][-1].endswith("/slurm")


def test_pyxis_command_line_with_a_recording_standin(home, standin_runs):
    run = standin_runs["pyxis"]
    run_dir = run["run_dir"]
    states = wait_run(home, "pyxis", timeout=240)
    assert {k: v["state"] for k, v in states.items()} == {"prepare": "COMPLETED", "train": "COMPLETED"}, states
    calls = [json.loads(l) for l in run["log"].read_text().splitlines()]
    assert len(calls) == 2, calls
    for call in calls:
        opts = call["opts"]
        assert opts["container-image"] == "nvcr.io#nvidia/pytorch:24.01-py3"
        assert opts["container-mounts"].split(",")[:2] == [str(run_dir), str(home / "data")], opts
        assert opts["container-workdir"] == str(run_dir)
        assert set(opts["container-env"].split(",")) >= {"PYTHONPATH", "HPC_JOBS_IT_CONTAINER"}
        assert "--kill-on-bad-exit=1" in call["srun"]
