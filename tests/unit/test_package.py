"""hpc-jobs as a package: the wheel works outside the checkout, workflows come from entry points.

One module-scoped fixture builds the wheel from a copy of the sources, makes a fresh venv (no system
site-packages, no checkout on sys.path) and installs the wheel there with its core dependencies only
(pinned by requirements/lock.txt): no torch. Every command then runs from a directory outside the
checkout with HPC_JOBS_HOME in tmp. The in-process tests at the end check the registry's rules
(sources, clashes, laziness) without a venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpc_jobs import __version__
from hpc_jobs import workflow as wfmod
from hpc_jobs.checkpoint import PLAIN_HEADER
from hpc_jobs.errors import UserError

REPO = Path(__file__).resolve().parents[2]
#: what the build needs (setup.py lists the packages, setup.cfg maps templates/ into hpc_jobs)
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "hpc_jobs", "launchers", "models", "data",
           "templates")


def _run(cmd, cwd, env=None, timeout=300, check=True):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name, **(
            {"ignore": ignore} if (REPO / name).is_dir() else {}))
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, "."], src)
    wheel = next(wheels.glob("hpc_jobs-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], root)  # no --system-site-packages
    py = venv / "bin" / "python"
    # the wheel with its (core) dependencies, at the versions CI tests
    _run([py, "-m", "pip", "install", "-q", "-c", REPO / "requirements" / "lock.txt", wheel], root, timeout=600)
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "HPC_JOBS_LAUNCHERS", "VIRTUAL_ENV", "HPC_JOBS_CLUSTER", "PYTHONHOME")}
    env.update(HPC_JOBS_HOME=str(root / "home"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def hpc(*args, cwd=work, check=True, **extra):
        return _run([venv / "bin" / "hpc-jobs", *args], cwd, env={**env, **extra}, check=check)

    return SimpleNamespace(root=root, wheel=wheel, venv=venv, py=py, work=work, env=env, hpc=hpc)


def test_the_wheel_holds_templates_profiles_and_the_workflows(pkg):
    names = set(zipfile.ZipFile(pkg.wheel).namelist())
    assert {"hpc_jobs/templates/sbatch.sh.j2", "hpc_jobs/templates/profiles/discovery.yaml",
            "hpc_jobs/templates/profiles/local.yaml", "launchers/demo.py", "hpc_jobs/cli.py"} <= names
    assert not any(n.startswith(("tests/", "docs/", "templates/")) for n in names)
    metadata = zipfile.ZipFile(pkg.wheel).read(f"hpc_jobs-{__version__}.dist-info/METADATA").decode()
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any("torch" in line for line in core), core  # the ML stack is the `workflows` extra
    assert any("torch" in line and 'extra == "workflows"' in line for line in metadata.splitlines())


def test_the_installed_command_works_outside_the_checkout(pkg):
    assert pkg.hpc("--version").stdout.strip() == f"hpc-jobs {__version__}"
    where = _run([pkg.py, "-c", "import hpc_jobs, importlib.util as u; print(hpc_jobs.__file__); "
                  "print(u.find_spec('torch'))"], pkg.work, env=pkg.env).stdout.split()
    assert where[0].startswith(str(pkg.venv)) and where[1] == "None", where  # the wheel's copy; no torch
    listing = pkg.hpc("list").stdout
    assert any(line.split()[:2] == ["demo", "shipped"] for line in listing.splitlines()), listing
    assert "discovery" in pkg.hpc("profiles").stdout


def test_demo_runs_locally_from_the_wheel_without_torch(pkg):
    out = pkg.hpc("demo", "--cluster", "local", "--run-name", "wheel-demo").stdout
    assert "COMPLETED  abs_error=" in out, out
    run = Path(pkg.env["HPC_JOBS_HOME"]) / "runs" / "demo" / "wheel-demo"
    assert (run / "code" / "templates" / "sbatch.sh.j2").exists()
    ckpt = run / "stages" / "train" / "checkpoints" / "last.pt"
    assert ckpt.read_bytes().startswith(PLAIN_HEADER)  # save_checkpoint without torch
    status = pkg.hpc("status", "wheel-demo", "--json").stdout
    assert '"COMPLETED"' in status
    assert "next: hpc-jobs status wheel-demo" in out, out  # hints name the command that was run


def test_a_research_workflow_on_the_core_alone_says_what_to_install_before_anything_runs(pkg):
    proc = pkg.hpc("diving", "--cluster", "local", "--run-name", "no-torch", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: workflow 'diving' needs torch, timm, einops, cv2, scipy, torchsort, which "), proc.stderr
    assert "pip install 'hpc-jobs[workflows]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (Path(pkg.env["HPC_JOBS_HOME"]) / "runs" / "diving" / "no-torch").exists()
    # jobs that run another environment (a container here) are not judged by this Python
    image = Path(pkg.env["HPC_JOBS_HOME"]).parent / "ml.sif"
    image.write_bytes(b"")  # only its path is read by a dry run
    dry = pkg.hpc("diving", "--cluster", "local", "--container", str(image), "--dry-run", check=False)
    assert dry.returncode == 0 and "dry run: scripts written under" in dry.stdout, dry.stdout + dry.stderr


def test_dry_run_with_a_shipped_profile(pkg):
    out = pkg.hpc("demo", "--dry-run", "--cluster", "discovery", "--account", "x").stdout
    assert "#SBATCH --account=x" in out and "#SBATCH --partition=main" in out, out[:2000]
    assert "module load" in out  # the discovery profile's setup lines, read from the package


def test_an_entry_point_workflow_is_listed_and_runs_and_a_clash_is_refused(pkg):
    plugin = pkg.root / "plugin"
    shutil.copytree(REPO / "docs" / "examples" / "plugin", plugin,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([pkg.py, "-m", "pip", "install", "-q", "--no-deps", plugin], pkg.root, env=pkg.env)
    line = next(x for x in pkg.hpc("list").stdout.splitlines() if x.startswith("charcount"))
    assert "entry point (hpc-jobs-example-plugin 0.1.0)" in line, line
    out = pkg.hpc("charcount", "--cluster", "local", "--run-name", "ep-run").stdout
    assert "merge  -    count  COMPLETED  chars=" in out, out
    run = Path(pkg.env["HPC_JOBS_HOME"]) / "runs" / "charcount" / "ep-run"
    assert (run / "code" / "hpc_jobs_example_plugin" / "charcount.py").exists()  # snapshotted like the rest

    # a second distribution that also claims `demo`: refused in one line naming both; it is never imported
    clash = pkg.root / "clash"
    (clash / "clashpkg").mkdir(parents=True)
    (clash / "clashpkg" / "__init__.py").write_text("raise SystemExit('imported')\n")
    (clash / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "clash-pkg"\nversion = "1.0"\n'
        '[project.entry-points."hpc_jobs.workflows"]\ndemo = "clashpkg"\n')
    _run([pkg.py, "-m", "pip", "install", "-q", "--no-deps", clash], pkg.root, env=pkg.env)
    try:
        for args in (["list"], ["demo", "--cluster", "local"]):
            proc = pkg.hpc(*args, check=False)
            assert proc.returncode == 2, proc
            err = proc.stderr.strip()
            assert len(err.splitlines()) == 1, err
            assert "workflow 'demo' is defined twice: shipped: launchers.demo and entry point (clash-pkg 1.0)" in err
        # the clash does not stop another workflow
        assert pkg.hpc("charcount", "--cluster", "local").returncode == 0
    finally:
        _run([pkg.py, "-m", "pip", "uninstall", "-q", "-y", "clash-pkg"], pkg.root, env=pkg.env)


def test_new_writes_a_skeleton_that_launches_as_it_is(pkg):
    lab = pkg.root / "lab"
    out = pkg.hpc("new", "linefit", "--dir", lab).stdout
    assert f"wrote {lab / 'linefit.py'}" in out
    assert pkg.hpc("new", "linefit", "--dir", lab, check=False).returncode == 2  # exists: no overwrite
    assert pkg.hpc("new", "demo", "--dir", lab, check=False).returncode == 2  # taken
    # from its directory, by a relative path
    out = pkg.hpc("linefit", "--cluster", "local", "--run-name", "skel", cwd=lab,
                  HPC_JOBS_LAUNCHERS="./linefit.py").stdout
    assert "evaluate  -    train    COMPLETED  abs_error=" in out, out
    run = Path(pkg.env["HPC_JOBS_HOME"]) / "runs" / "linefit" / "skel"
    assert (run / "code" / "linefit.py").exists()
    listing = pkg.hpc("list", HPC_JOBS_LAUNCHERS=str(lab / "linefit.py")).stdout
    assert any(x.split()[:2] == ["linefit", "HPC_JOBS_LAUNCHERS"] for x in listing.splitlines()), listing


# -- the registry, in process --------------------------------------------------------------------------
class _EP:
    """An importlib.metadata.EntryPoint stand-in: name, value, dist, load()."""

    def __init__(self, name, value, dist="lab-pkg", target=None):
        self.name, self.value = name, value
        self.dist = SimpleNamespace(metadata={"Name": dist}, name=dist, version="2.0")
        self._target = target

    def load(self):
        if self._target is None:
            raise AssertionError(f"entry point {self.name} was loaded")
        return self._target


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.delenv("HPC_JOBS_LAUNCHERS", raising=False)
    wfmod._load_builtin()  # the shipped workflows, registered for good (their modules are imported once)
    monkeypatch.setattr(wfmod, "_REGISTRY", dict(wfmod._REGISTRY))
    monkeypatch.setattr(wfmod, "_SOURCES", dict(wfmod._SOURCES))
    monkeypatch.setattr(wfmod, "_EXTRA_CODE", dict(wfmod._EXTRA_CODE))
    eps = {}
    monkeypatch.setattr(wfmod, "entry_points", lambda: eps)
    return eps


def _workflow(name):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        x: int = 1

    return type("W", (wfmod.Workflow,), {"name": name, "summary": "s", "Config": Cfg, "__module__": "lab.wf"})


def test_get_loads_only_the_entry_point_it_launches(registry):
    registry["mine"] = [_EP("mine", "lab.wf:W", target=_workflow("mine"))]
    registry["broken"] = [_EP("broken", "lab.broken:W")]  # loading it would fail the test
    assert wfmod.get("demo").name == "demo"
    assert wfmod.get("mine").name == "mine"
    assert wfmod.source("mine") == "entry point (lab-pkg 2.0)" and wfmod.source("demo") == "shipped"
    with pytest.raises(UserError, match="unknown workflow 'mien'. Did you mean 'mine'"):
        wfmod.get("mien")


def test_clashes_are_one_line_naming_both_sources(registry):
    registry["twice"] = [_EP("twice", "a.wf:W", dist="a-pkg"), _EP("twice", "b.wf:W", dist="b-pkg")]
    with pytest.raises(UserError, match=r"workflow 'twice' is defined twice: entry point \(a-pkg 2.0\): a.wf:W and "
                                        r"entry point \(b-pkg 2.0\): b.wf:W"):
        wfmod.get("twice")
    registry.clear()
    registry["folds"] = [_EP("folds", "lab.wf:W", target=_workflow("folds"))]
    with pytest.raises(UserError, match=r"'folds' is defined twice: shipped: launchers.folds and entry point"):
        wfmod.discover()
    registry.clear()
    registry["other"] = [_EP("other", "lab.wf:W", target=_workflow("mine"))]
    with pytest.raises(UserError, match="give the entry point the workflow's name"):
        wfmod.get("other")


def test_launchers_entry_by_path(registry, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "json.py").write_text("")
    monkeypatch.setenv("HPC_JOBS_LAUNCHERS", str(tmp_path / "json.py"))
    with pytest.raises(UserError, match="the module name 'json' is already taken"):
        wfmod.discover()
    monkeypatch.setenv("HPC_JOBS_LAUNCHERS", str(tmp_path / "nothere.py"))
    with pytest.raises(UserError, match="does not exist"):
        wfmod.discover()


def test_messages_name_the_program_being_run_before_the_one_jobs_inherit(monkeypatch):
    from hpc_jobs.errors import command

    monkeypatch.setenv("HPC_JOBS_COMMAND", "python launch.py")  # e.g. left by an earlier launch in this shell
    for argv0, expected in (("/venv/bin/hpc-jobs", "hpc-jobs"), ("/src/hpc_jobs/__main__.py", "python -m hpc_jobs"),
                            ("launch.py", "python launch.py")):
        monkeypatch.setattr("sys.argv", [argv0])
        assert command() == expected
    monkeypatch.setattr("sys.argv", ["/venv/lib/submitit/core/_submit.py"])  # inside a job: what the launch said
    monkeypatch.setenv("HPC_JOBS_COMMAND", "hpc-jobs")
    assert command() == "hpc-jobs"
