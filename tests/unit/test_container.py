"""Containers (hpc_jobs/container.py): settings and their merge, validation, the step line of each
runtime, the OCI bundle a stage gets, the scontrol relay, --container on the command line, debug."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_jobs import container as C
from hpc_jobs import profiles, render
from hpc_jobs.errors import UserError
from hpc_jobs.spec import Pipeline, Resources, Stage
from launchers import demo

REPO = Path(__file__).resolve().parents[2]
RUN = Path("/scratch1/ttrojan/hpc_jobs/runs/demo/r1")


def _job(stage, profile="generic", **kw):
    return render.build_job(stage, profiles.load(profile), workflow="demo", run_id="r1", run_dir=RUN,
                            launch_python="/opt/venv/bin/python", **kw)


def _stage(container, gpus=0, **kw):
    return Stage("train", demo.train, resources=Resources(gpus_per_node=gpus), container=container, **kw)


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path):
    monkeypatch.setenv("HPC_JOBS_HOME", "/home/ttrojan/hpc_jobs")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


# -- settings -------------------------------------------------------------------------------------
def test_stage_over_profile_and_cli_over_both_binds_and_env_add_up():
    prof = C.Container(runtime="apptainer", binds=("/project",), env={"A": "1", "B": "p"})
    stage = C.Container(image="/img/stage.sif", binds=("/scratch1/x:/x:ro",), env={"B": "s"})
    cli = C.Container(image="/img/cli.sif")
    got = C.resolve(prof, stage, cli, "stage 'train'")
    assert (got.runtime, got.image, got.python) == ("apptainer", "/img/cli.sif", "python")
    assert list(got.binds) == ["/project", "/scratch1/x:/x:ro"] and got.env == {"A": "1", "B": "s"}
    assert C.resolve(prof, None, None, "s") is None  # a profile without an image containerises nothing
    assert C.resolve(None, None, None, "s") is None


@pytest.mark.parametrize("image, runtime", [("/x/a.sif", "apptainer"), ("docker://pytorch/pytorch:2.1", "apptainer"),
                                            ("nvcr.io#nvidia/pytorch:24.01-py3", "pyxis"), ("/x/a.sqsh", "pyxis")])
def test_runtime_from_the_image(image, runtime):
    assert C.resolve(None, C.Container(image=image), None, "s").runtime == runtime


def test_runtime_of_an_oci_bundle_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert C.resolve(None, C.Container(image=str(tmp_path)), None, "s").runtime == "oci"
    with pytest.raises(UserError, match="cannot tell the container runtime"):
        C.resolve(None, C.Container(image=str(tmp_path / "rootfs")), None, "s")


@pytest.mark.parametrize("bad, message", [
    (dict(runtime="docker", image="/x.sif"), "runtime 'docker' is unknown: use one of apptainer, singularity, pyxis, oci"),
    (dict(image="/x.sif; rm -rf ~"), "has characters an image name never holds"),
    (dict(image="/x.sif", binds=("data",)), "must be an absolute path"),
    (dict(image="/x.sif", binds=("/a,b",)), "no spaces, commas"),
    (dict(image="/x.sif", binds=("/a:/b:rx",)), "the mode must be ro or rw"),
    (dict(image="/x.sif", env={"1BAD": "x"}), "environment variable name '1BAD' is invalid"),
    (dict(image="/x.sif", gpus="yes"), "gpus must be true, false"),
])
def test_bad_settings_are_one_line_user_errors(bad, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        Pipeline("demo", [_stage(C.Container(**bad))])
    assert "\n" not in str(err.value)


def test_stage_container_as_a_mapping_and_only_on_batch_stages():
    stage = _stage({"image": "/x.sif", "binds": ["/project"]})
    Pipeline("demo", [stage])
    assert isinstance(stage.container, C.Container) and stage.container.binds == ("/project",)
    with pytest.raises(UserError, match="unknown container keys mounts"):
        Pipeline("demo", [_stage({"image": "/x.sif", "mounts": ["/p"]})])
    with pytest.raises(UserError, match="a container runs batch stages only"):
        Pipeline("demo", [Stage("fetch", demo.fetch, where="login", container={"image": "/x.sif"})])


def _user_profile(tmp_path, name, container):
    import yaml

    data = yaml.safe_load((REPO / "templates" / "profiles" / "generic.yaml").read_text())
    data["container"] = container
    folder = tmp_path / "config" / "hpc_jobs" / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))


def test_profile_container_key_is_checked_at_load(tmp_path):
    _user_profile(tmp_path, "bad", {"runtime": "podman", "image": "/x.sif"})
    with pytest.raises(UserError, match="runtime 'podman' is unknown"):
        profiles.load("bad")
    _user_profile(tmp_path, "good", {"runtime": "apptainer", "image": "/scratch1/$USER/a.sif",
                                     "binds": ["/scratch1/$USER"]})
    container = profiles.load("good").container_default()
    user = os.environ.get("USER") or __import__("getpass").getuser()
    assert container.image == f"/scratch1/{user}/a.sif" and container.binds == (f"/scratch1/{user}",)


def test_image_must_exist_where_jobs_are_submitted(monkeypatch, tmp_path):
    monkeypatch.setattr(render.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(UserError, match=r"container image '/nonexistent/a.sif' does not exist"):
        _job(_stage(C.Container(runtime="apptainer", image="/nonexistent/a.sif")))
    with pytest.raises(UserError, match="OCI bundle '.*' does not exist or has no config.json"):
        _job(_stage(C.Container(runtime="oci", image=str(tmp_path))))
    image = tmp_path / "a.sif"
    image.write_text("x")
    assert _job(_stage(C.Container(image=str(image)))).container["runtime"] == "apptainer"
    # registry images are the runtime's business
    assert _job(_stage(C.Container(image="docker://pytorch/pytorch:2.1")))
    monkeypatch.setattr(render.shutil, "which", lambda name: None)  # no sbatch: a dry run for another cluster
    assert _job(_stage(C.Container(runtime="apptainer", image="/nonexistent/a.sif")))


# -- rendering ------------------------------------------------------------------------------------
def test_every_runtime_binds_the_run_dir_and_data_root_and_quotes_values(monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    for runtime, image in (("apptainer", "/img/a.sif"), ("singularity", "/img/a.sif"),
                           ("pyxis", "nvcr.io#nvidia/pytorch:24.01-py3"), ("oci", "/img/bundle")):
        job = _job(_stage(C.Container(runtime=runtime, image=image, env={"MSG": "it's $HOME; ok"}), gpus=2))
        text = render.render(job)
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, runtime
        assert str(RUN) in job.command and "/home/ttrojan/hpc_jobs/data" in text, runtime
        value = "it's $HOME; ok"
        quoted = shlex.quote(value) if runtime == "pyxis" else shlex.quote(f"MSG={value}")
        assert quoted in text and quoted != value, runtime
        assert "-m hpc_jobs.container enter python -u -m submitit.core._submit" in job.command
        assert 'scontrol requeue "$hpc_jobs_target"' in text
    apptainer = _job(_stage(C.Container(runtime="apptainer", image="/img/a.sif"), gpus=2)).command
    assert "apptainer exec --nv --pwd" in apptainer
    assert "--nv" not in _job(_stage(C.Container(runtime="apptainer", image="/img/a.sif"), gpus=0)).command
    assert "--nv" in _job(_stage(C.Container(runtime="apptainer", image="/img/a.sif", gpus=True), gpus=0)).command


def test_env_value_reaches_the_shell_intact(monkeypatch):
    """The pyxis environment is exported on the host: a value with quotes and $ survives as it is."""
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    job = _job(_stage(C.Container(runtime="pyxis", image="nvcr.io#x", env={"MSG": "it's $HOME; ok"})))
    line = next(l for l in job.prelude if l.startswith("export MSG="))
    out = subprocess.run(["bash", "-c", line + '\nprintf %s "$MSG"'], capture_output=True, text=True).stdout
    assert out == "it's $HOME; ok"


def test_no_container_leaves_the_script_as_it_was():
    job = _job(_stage(None))
    assert job.container is None and job.prelude == [] and job.epilogue == []
    assert "container" not in render.render(job)


# -- the OCI bundle of a stage --------------------------------------------------------------------
def _image(tmp_path):
    image = tmp_path / "image"
    rootfs = image / "rootfs"
    for d in ("usr", "etc", "opt", "proc", "tmp"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "bin").symlink_to("usr/bin")
    (rootfs / "hello.txt").write_text("hi")
    (image / "config.json").write_text(json.dumps({
        "process": {"env": ["PATH=/usr/bin", "LANG=C"], "cwd": "/", "user": {"uid": 1000, "gid": 1000}},
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}]}))
    return image


def test_oci_bundle_is_a_skeleton_of_binds_over_the_image(tmp_path):
    image = _image(tmp_path)
    bundle = tmp_path / "run" / "stages" / "train" / "oci"
    for _ in range(2):  # every attempt writes it again: the same result
        C.write_oci_bundle(str(image), str(bundle), "/runs/r1", ["/runs/r1", "/data", "/project:/p:ro"],
                           ["LANG=en_US.UTF-8", "HF_HOME=/data/hf"])
    config = json.loads((bundle / "config.json").read_text())
    assert config["root"] == {"path": "rootfs", "readonly": True}
    skeleton = bundle / "rootfs"
    assert skeleton.is_dir() and not skeleton.is_symlink()
    assert os.readlink(skeleton / "bin") == "usr/bin" and (skeleton / "hello.txt").is_file()
    mounts = [(m["destination"], m.get("source"), m.get("options")) for m in config["mounts"]]
    assert mounts == [
        ("/etc", str(image / "rootfs" / "etc"), ["rbind"]),
        ("/hello.txt", str(image / "rootfs" / "hello.txt"), ["rbind"]),
        ("/opt", str(image / "rootfs" / "opt"), ["rbind"]),
        ("/usr", str(image / "rootfs" / "usr"), ["rbind"]),
        ("/proc", "proc", None),
        ("/tmp", "tmpfs", None),
        ("/runs/r1", "/runs/r1", ["rbind"]),
        ("/data", "/data", ["rbind"]),
        ("/p", "/project", ["rbind", "ro"]),
    ]
    assert config["process"]["cwd"] == "/runs/r1" and config["process"]["user"] == {"uid": 1000, "gid": 1000}
    assert config["process"]["env"] == ["PATH=/usr/bin", "LANG=en_US.UTF-8", "HF_HOME=/data/hf"]


def test_oci_bundle_command_line(tmp_path):
    image = _image(tmp_path)
    bundle = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "hpc_jobs.container", "oci-bundle", str(image), str(bundle),
                           "--cwd", "/r", "--bind", "/r", "--env", "A=1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((bundle / "config.json").read_text())["process"]["env"][-1] == "A=1"
    proc = subprocess.run([sys.executable, "-m", "hpc_jobs.container", "oci-bundle", str(tmp_path / "none"),
                           str(bundle), "--cwd", "/r"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "No such file" in proc.stderr


# -- the scontrol relay inside a container --------------------------------------------------------
def _enter(tmp_path, *cmd, extra_path=None, only_path=False):
    run_dir = tmp_path / "run"
    (run_dir / "stages" / "train").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HPC_JOBS_RUN_DIR=str(run_dir), HPC_JOBS_STAGE="train", SLURM_JOB_ID="77",
               PYTHONPATH=str(REPO), PATH=str(tmp_path / "empty") if only_path else
               (f"{extra_path}:" if extra_path else "") + "/usr/bin:/bin")
    return subprocess.run([sys.executable, "-m", "hpc_jobs.container", "enter", *cmd], env=env,
                          capture_output=True, text=True), run_dir / "stages" / "train"


def test_relay_records_a_requeue_for_the_batch_script(tmp_path):
    proc, stage_dir = _enter(tmp_path, "scontrol", "requeue", "77_3")
    assert proc.returncode == 0, proc.stderr
    assert (stage_dir / ".requeue.77").read_text() == "77_3\n"
    proc, _ = _enter(tmp_path, "scontrol", "requeue", "77;reboot")
    assert proc.returncode == 1 and "is not a job id" in proc.stderr


def test_relay_passes_other_commands_to_the_images_scontrol(tmp_path):
    real = tmp_path / "bin"
    real.mkdir()
    (real / "scontrol").write_text("#!/bin/sh\necho real scontrol: \"$@\"\n")
    (real / "scontrol").chmod(0o755)
    proc, _ = _enter(tmp_path, "scontrol", "show", "job", "77", extra_path=real)
    assert proc.returncode == 0 and proc.stdout == "real scontrol: show job 77\n", proc.stderr
    proc, _ = _enter(tmp_path, "scontrol", "show", "job", "77", only_path=True)  # an image without Slurm
    assert proc.returncode == 1 and "not in this container" in proc.stderr


def test_batch_script_epilogue_makes_the_relayed_requeue(tmp_path):
    """The host side: after the step, the request left by the relay becomes `scontrol requeue`."""
    step = C.wrap_step(C.Container(runtime="apptainer", image="/i.sif"), ["srun"], "python x", run_dir="/r",
                       data_root="/d", code_dir="/r/code", stage_dir=str(tmp_path), uses_gpus=False)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n")
    (bindir / "scontrol").chmod(0o755)
    script = "\n".join(step.prelude[1:]) + "\n" + f"echo 77 > {tmp_path}/.requeue.77; false\n" + "\n".join(step.epilogue)
    env = dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin", SLURM_JOB_ID="77")
    assert subprocess.run(["bash", "-c", script], env=env).returncode == 0
    assert (tmp_path / "scontrol.args").read_text() == "requeue 77\n" and not (tmp_path / ".requeue.77").exists()
    # no request from this attempt (a stale one is removed before the step): the step's exit code
    no_request = "\n".join(step.prelude[1:]) + "\nfalse\n" + "\n".join(step.epilogue)
    (tmp_path / ".requeue.77").write_text("77\n")
    (tmp_path / "scontrol.args").unlink()
    assert subprocess.run(["bash", "-c", no_request], env=env).returncode == 1
    assert not (tmp_path / "scontrol.args").exists()


# -- the command line -----------------------------------------------------------------------------
def _cli(tmp_path, *args):
    env = dict(os.environ, HPC_JOBS_HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"))
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_unknown_runtime_is_one_line_exit_2(tmp_path):
    proc = _cli(tmp_path, "demo", "--cluster", "discovery", "--account", "a", "--container", "/x.sif",
                "--container-runtime", "docker", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "container runtime 'docker' is unknown" in proc.stderr


def test_cli_missing_image_of_a_profile_container_is_one_line_exit_2(tmp_path):
    _user_profile(tmp_path, "withimage", {"runtime": "apptainer", "image": "/nonexistent/sensorium.sif"})
    proc = _cli(tmp_path, "demo", "--cluster", "withimage", "--dry-run")
    if render.shutil.which("sbatch"):
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "container image '/nonexistent/sensorium.sif' does not exist" in proc.stderr
    else:  # no sbatch here: a dry run for another cluster renders the cluster's paths unchecked
        assert proc.returncode == 0, proc.stderr


def test_apply_cli_container_sets_every_batch_stage():
    from hpc_jobs.workflow import LaunchOptions

    pipeline = Pipeline("demo", [Stage("fetch", demo.fetch, where="login"),
                                 Stage("train", demo.train, container={"runtime": "apptainer", "image": "/a.sif",
                                                                      "binds": ["/p"]})])
    C.apply_cli_container(pipeline, LaunchOptions(container="/b.sif"))
    assert pipeline["fetch"].container is None
    assert pipeline["train"].container.image == "/b.sif" and pipeline["train"].container.binds == ("/p",)
    with pytest.raises(UserError, match="runtime 'rkt' is unknown"):
        LaunchOptions(container="/b.sif", container_runtime="rkt")


# -- debug: the same container under salloc -------------------------------------------------------
def test_debug_script_runs_the_stage_in_the_batch_jobs_container(monkeypatch, tmp_path):
    from hpc_jobs import debug, launch
    from hpc_jobs.workflow import LaunchOptions

    monkeypatch.setenv("HPC_JOBS_LAUNCHERS", "tests.workflows")
    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    _user_profile(tmp_path, "disc", {"runtime": "apptainer", "image": "/scratch1/ttrojan/images/faultlab.sif",
                                     "binds": ["/project/p:/project:ro"], "python": "/opt/conda/bin/python"})

    def plan(**options):
        req = launch.LaunchRequest(workflow="faultlab", cluster="disc", options=LaunchOptions(**options),
                                   dry_run=True)
        return debug.prepare(req, debug.DebugRequest(stage="prepare", dry_run=True), echo=lambda msg: None)

    dplan = plan()
    text = dplan.script_path.read_text()
    run_dir = dplan.run.dir
    assert f"apptainer exec --pwd {run_dir} --bind {run_dir} --bind {tmp_path}/home/data --bind /project/p:/project:ro" in text
    assert "/scratch1/ttrojan/images/faultlab.sif \\\n    /opt/conda/bin/python -u -m hpc_jobs.debug inner" in text
    assert "scontrol requeue" not in text and "--kill-on-bad-exit" not in text  # an interactive allocation
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    # --container (and --container-runtime) on the debug command line: that image, the profile's binds
    text = plan(container="/scratch1/ttrojan/images/other.sif", container_runtime="singularity").script_path.read_text()
    assert "singularity exec" in text and "/scratch1/ttrojan/images/other.sif \\\n" in text and "/project/p:/project:ro" in text
