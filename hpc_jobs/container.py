"""Stages in containers: one setting for Apptainer/Singularity, Pyxis/enroot and Slurm's OCI support.

A :class:`Container` says which runtime runs a stage's tasks, from which image, with which extra
bind mounts, environment variables and GPU flag. It can be set in a cluster profile (``container:``,
the default of every batch stage), on a :class:`~hpc_jobs.spec.Stage` (``container=``) and on the
command line (``--container IMAGE``); :func:`resolve` merges them. Rendering only changes the step
line of the batch script (the batch script itself stays on the host, with the profile's setup
lines), as a pure function (:func:`wrap_step`):

* ``apptainer`` / ``singularity``: ``srun ... apptainer exec --nv --bind SRC:DST ... IMAGE <cmd>``
* ``pyxis``: ``srun --container-image=IMAGE --container-mounts=SRC:DST,... <cmd>``
* ``oci``: ``srun --container=BUNDLE <cmd>``, where BUNDLE is the stage's own bundle
  (``stages/<name>/oci``): IMAGE's ``config.json`` plus the binds, written on the host just before
  the step by ``python3 -m hpc_jobs.container oci-bundle`` (Slurm takes mounts only from a bundle).

The run directory (which holds the code snapshot) and the data root are always bound. Inside the
container the command starts through ``python -m hpc_jobs.container enter``, which puts a
``scontrol`` relay first on PATH: an image without Slurm can still ask for its own requeue (the
requeue-and-resume protocol); the relay writes the request to the stage directory and the batch
script, on the host, runs the real ``scontrol requeue`` when the step has ended.

Standard library only: ``oci-bundle`` runs on compute nodes before any environment is activated.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import UserError

RUNTIMES = ("apptainer", "singularity", "pyxis", "oci")
#: image references that are not paths on this machine (pulled or converted by the runtime)
REMOTE_PREFIXES = ("docker://", "docker-daemon://", "library://", "oras://", "shub://", "http://", "https://")
#: a host path or container path in a bind: no ',' (Pyxis joins mounts with it), no ':' (the separator)
BIND_PATH = re.compile(r"^/[A-Za-z0-9_.+@%=~/\-]*$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: what ``--container-image`` / an image path may hold: Pyxis's ``registry#image:tag`` included
IMAGE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%=+/#~\-]+$")
REQUEUE_TARGET = re.compile(r"^[0-9]+(_[0-9]+)?$")
RELAY_DIR = ".container_bin"  # in the stage directory: the scontrol relay of the containers


@dataclass
class Container:
    """How a stage's tasks run in a container. Any field left ``None`` comes from the level below
    (stage over profile; ``--container`` over both)."""

    runtime: Optional[str] = None  # apptainer | singularity | pyxis | oci; None: from the image
    image: Optional[str] = None  # .sif / sandbox dir / docker:// (apptainer), squashfs or registry#image (pyxis), bundle dir (oci)
    binds: Sequence[str] = ()  # "SRC", "SRC:DST" or "SRC:DST:ro"; added to the run directory and data root
    env: Mapping[str, str] = field(default_factory=dict)  # set inside the container
    gpus: Optional[bool] = None  # GPU support (apptainer --nv); None: when the stage asks for GPUs
    python: Optional[str] = None  # the interpreter inside the image; None: "python"

    @classmethod
    def from_value(cls, value: Any, where: str) -> Optional["Container"]:
        """A Container, a mapping (YAML), a plain image string, or None."""
        if value is None or isinstance(value, Container):
            return value
        if isinstance(value, str):
            return cls(image=value)
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: container must be a mapping (runtime, image, binds, env, gpus, python), "
                            f"not {type(value).__name__}")
        known = {"runtime", "image", "binds", "env", "gpus", "python"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"{where}: unknown container keys {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        binds = value.get("binds") or ()
        if isinstance(binds, str):
            binds = [b for b in binds.split(",") if b]
        return cls(runtime=value.get("runtime"), image=value.get("image"), binds=tuple(binds),
                   env=dict(value.get("env") or {}), gpus=value.get("gpus"), python=value.get("python"))

    def validate(self, where: str) -> None:
        """Types and values; not whether the image exists (see :func:`check_image`)."""
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise UserError(f"{where}: container runtime '{self.runtime}' is unknown: use one of {', '.join(RUNTIMES)}")
        if self.image is not None and (not isinstance(self.image, str) or not IMAGE_VALUE.match(self.image)):
            raise UserError(f"{where}: container image '{self.image}' has characters an image name never holds "
                            "(spaces, quotes, ';', '$', ...)")
        if isinstance(self.binds, str) or not all(isinstance(b, str) for b in self.binds):
            raise UserError(f"{where}: container binds must be a list of 'SRC[:DST[:ro]]' strings")
        for bind in self.binds:
            parse_bind(bind, where)
        if not isinstance(self.env, Mapping):
            raise UserError(f"{where}: container env must be a mapping NAME: value")
        for key, value in self.env.items():
            if not isinstance(key, str) or not ENV_KEY.match(key):
                raise UserError(f"{where}: container environment variable name '{key}' is invalid")
            if "\n" in str(value):
                raise UserError(f"{where}: container environment variable {key} holds a newline")
        if self.gpus not in (None, True, False):
            raise UserError(f"{where}: container gpus must be true, false or left out, not {self.gpus!r}")
        if self.python is not None and (not isinstance(self.python, str) or not self.python.strip()):
            raise UserError(f"{where}: container python must be a command, e.g. python or /opt/conda/bin/python")

    def to_dict(self) -> Dict[str, Any]:
        return {"runtime": self.runtime, "image": self.image, "binds": list(self.binds), "env": dict(self.env),
                "gpus": self.gpus, "python": self.python}


def parse_bind(bind: str, where: str) -> Tuple[str, str, bool]:
    """``SRC[:DST[:ro|rw]]`` -> (src, dst, read_only)."""
    parts = bind.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UserError(f"{where}: container bind '{bind}' is not SRC, SRC:DST or SRC:DST:ro")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    mode = parts[2] if len(parts) > 2 else "rw"
    if mode not in ("ro", "rw"):
        raise UserError(f"{where}: container bind '{bind}': the mode must be ro or rw, not '{mode}'")
    for path in (src, dst):
        if not BIND_PATH.match(path):
            raise UserError(f"{where}: container bind '{bind}': '{path}' must be an absolute path of letters, "
                            "digits and . _ + @ % = ~ / - (no spaces, commas, colons or quotes)")
    return src, dst, mode == "ro"


def infer_runtime(image: str) -> Optional[str]:
    """The runtime an image name implies, if any."""
    if image.endswith(".sif") or image.endswith(".simg") or image.startswith(REMOTE_PREFIXES):
        return "apptainer"
    if image.endswith(".sqsh") or "#" in image:
        return "pyxis"
    if os.path.isfile(os.path.join(image, "config.json")):
        return "oci"
    return None


def is_local_path(image: str) -> bool:
    return image.startswith("/") or image.startswith("./") or image.startswith("~")


def check_image(container: "Container", where: str) -> None:
    """An apptainer/singularity/oci image given as a path must exist here (pyxis: a squashfs path)."""
    image = container.image or ""
    if not is_local_path(image):
        if container.runtime == "oci":
            raise UserError(f"{where}: OCI image '{image}' must be the path of a bundle directory (config.json + rootfs)")
        return
    path = Path(os.path.expanduser(image))
    if container.runtime == "oci":
        if not (path / "config.json").is_file():
            raise UserError(f"{where}: OCI bundle '{image}' does not exist or has no config.json: give a bundle "
                            "directory (config.json + rootfs), e.g. from `umoci unpack`")
    elif not path.exists():
        raise UserError(f"{where}: container image '{image}' does not exist: build or copy it first "
                        f"(apptainer build IMAGE.sif docker://...), or fix the path")


def resolve(profile_default: Optional[Container], stage_container: Optional[Container],
            cli: Optional[Container], where: str) -> Optional[Container]:
    """The stage's container: ``cli`` over the stage's over the profile's, field by field; binds and
    environment add up. None when no level names an image."""
    levels = [c for c in (profile_default, stage_container, cli) if c is not None]
    if not levels:
        return None
    image = next((c.image for c in reversed(levels) if c.image), None)
    if image is None:
        if stage_container is None and cli is None:
            return None  # a profile that only sets the runtime and binds: no container until an image is named
        raise UserError(f"{where}: the container has no image: give --container IMAGE, or image: in the "
                        "stage's or the profile's container setting")
    runtime = next((c.runtime for c in reversed(levels) if c.runtime), None) or infer_runtime(image)
    if runtime is None:
        raise UserError(f"{where}: cannot tell the container runtime of image '{image}': give "
                        f"--container-runtime (or runtime:) {'|'.join(RUNTIMES)}")
    binds: List[str] = []
    env: Dict[str, str] = {}
    for c in levels:
        binds += [b for b in c.binds if b not in binds]
        env.update({k: str(v) for k, v in c.env.items()})
    gpus = next((c.gpus for c in reversed(levels) if c.gpus is not None), None)
    python = next((c.python for c in reversed(levels) if c.python), None) or "python"
    out = Container(runtime=runtime, image=image, binds=tuple(binds), env=env, gpus=gpus, python=python)
    out.validate(where)
    return out


def apply_cli_container(pipeline: Any, options: Any) -> None:
    """``--container IMAGE`` (and ``--container-runtime``): every batch stage runs in that image."""
    image = getattr(options, "container", None)
    runtime = getattr(options, "container_runtime", None)
    if not image and not runtime:
        return
    cli = Container(runtime=runtime, image=image)
    cli.validate("--container")
    for stage in pipeline:
        if stage.where == "batch":
            stage.container = merge(stage.container, cli)


def merge(base: Optional[Container], over: Container) -> Container:
    if base is None:
        return over
    return Container(runtime=over.runtime or base.runtime, image=over.image or base.image,
                     binds=tuple(base.binds) + tuple(b for b in over.binds if b not in base.binds),
                     env={**base.env, **over.env}, gpus=over.gpus if over.gpus is not None else base.gpus,
                     python=over.python or base.python)


# -- rendering (pure) ------------------------------------------------------------------------------
@dataclass
class WrappedStep:
    """What the batch script runs for a containerised step."""

    prelude: List[str]  # host lines before the step (data root, OCI bundle)
    command: str  # the srun line
    epilogue: List[str]  # host lines after the step (the requeue relay)


def required_binds(run_dir: str, data_root: str, code_dir: str) -> List[str]:
    """Always bound: the run directory, the data root and the code snapshot (inside the run directory
    unless a runs root moves it)."""
    binds = [run_dir, data_root]
    if not (code_dir + "/").startswith(run_dir.rstrip("/") + "/"):
        binds.append(code_dir)
    return binds


def all_binds(container: Container, run_dir: str, data_root: str, code_dir: str, where: str) -> List[Tuple[str, str, bool]]:
    out: List[Tuple[str, str, bool]] = []
    seen = set()
    for bind in required_binds(run_dir, data_root, code_dir) + list(container.binds):
        src, dst, ro = parse_bind(bind, where)
        if dst not in seen:
            seen.add(dst)
            out.append((src, dst, ro))
    return out


def _bind_text(src: str, dst: str, ro: bool) -> str:
    return src + (f":{dst}" if dst != src or ro else "") + (":ro" if ro else "")


def inner_command(container: Container, python: str, args: Sequence[str]) -> str:
    """``python -m hpc_jobs.container enter python ARGS``: the relay goes on PATH, then ARGS run."""
    return f"{python} -m hpc_jobs.container enter {python} {shlex.join(args)}"


def wrap_step(container: Container, srun: Sequence[str], inner: str, *, run_dir: str, data_root: str,
              code_dir: str, stage_dir: str, uses_gpus: bool, relay: bool = True) -> WrappedStep:
    """The srun line that runs ``inner`` (shell text: the python command) in ``container``."""
    where = f"container of {stage_dir}"
    binds = all_binds(container, run_dir, data_root, code_dir, where)
    q = shlex.quote
    prelude = [f"mkdir -p {q(data_root)}  # a bind source must exist"]
    srun = list(srun)
    if relay:
        # one rank asking for a requeue (then exiting) must end the whole step, as Slurm's requeue would
        srun.append("--kill-on-bad-exit=1")
        prelude += [f"hpc_jobs_requeue={q(stage_dir)}/.requeue.$SLURM_JOB_ID  # the scontrol relay's request",
                    'rm -f "$hpc_jobs_requeue"  # one left by an attempt that was killed is not this one\'s']
    rt = container.runtime
    image = container.image or ""
    if rt in ("apptainer", "singularity"):
        gpus = container.gpus if container.gpus is not None else uses_gpus
        words = [rt, "exec"] + (["--nv"] if gpus else []) + ["--pwd", run_dir]
        for src, dst, ro in binds:
            words += ["--bind", _bind_text(src, dst, ro)]
        for key, value in sorted(container.env.items()):
            words += ["--env", f"{key}={value}"]
        command = _lines(shlex.join(srun), shlex.join(words) + " " + q(image), inner)
    elif rt == "pyxis":
        mounts = ",".join(_bind_text(s, d, ro) for s, d, ro in binds)
        words = [f"--container-image={image}", f"--container-mounts={mounts}", f"--container-workdir={run_dir}"]
        # the image's own ENV wins over the host's unless named here: the code snapshot's PYTHONPATH must not lose
        names = ["PYTHONPATH", "HPC_JOBS_RUN_DIR", "HPC_JOBS_STAGE"] + sorted(container.env)
        words.append("--container-env=" + ",".join(names))
        prelude += [f"export {k}={q(v)}" for k, v in sorted(container.env.items())]
        command = _lines(shlex.join(srun), shlex.join(words), inner)
    elif rt == "oci":
        bundle = f"{stage_dir}/oci"
        args = ["python3", "-m", "hpc_jobs.container", "oci-bundle", image, bundle, "--cwd", run_dir]
        for src, dst, ro in binds:
            args += ["--bind", _bind_text(src, dst, ro)]
        for key, value in sorted(container.env.items()):
            args += ["--env", f"{key}={value}"]
        prelude.append("# Slurm takes mounts only from a bundle: this stage's is the image's config.json plus the binds")
        prelude.append(shlex.join(args) + " || exit 1")
        command = _lines(shlex.join(srun), shlex.join([f"--container={bundle}"]), inner)
    else:  # validated before
        raise UserError(f"{where}: container runtime '{rt}' is unknown: use one of {', '.join(RUNTIMES)}")
    epilogue: List[str] = []
    if relay:
        epilogue = [
            "hpc_jobs_rc=$?",
            "# a requeue asked from inside the container (hpc-jobs' scontrol relay) is made here, on the host",
            'if [ -f "$hpc_jobs_requeue" ]; then',
            '    hpc_jobs_target=$(cat "$hpc_jobs_requeue"); rm -f "$hpc_jobs_requeue"',
            '    scontrol requeue "$hpc_jobs_target" && exit 0',
            "fi",
            'exit "$hpc_jobs_rc"',
        ]
    return WrappedStep(prelude, command, epilogue)


def _lines(*parts: str) -> str:
    """One command over several lines (srun, the runtime, the command inside): readable in --dry-run."""
    return " \\\n    ".join(parts)


# -- on the compute node ---------------------------------------------------------------------------
RELAY_SCRIPT = """#!/bin/sh
# hpc-jobs' scontrol relay inside a container (python -m hpc_jobs.container enter put it on PATH).
# 'scontrol requeue ID' leaves the request in the stage directory; the batch script makes it on the
# host when the step has ended. Anything else goes to the image's own scontrol, if it has one.
if [ "$1" = requeue ] && [ $# -eq 2 ]; then
    case "$2" in ''|*[!0-9_]*) echo "scontrol relay: '$2' is not a job id" >&2; exit 1;; esac
    request="$HPC_JOBS_RUN_DIR/stages/$HPC_JOBS_STAGE/.requeue.$SLURM_JOB_ID"
    printf '%s\\n' "$2" > "$request.tmp" && mv -f "$request.tmp" "$request" || exit 1
    echo "hpc-jobs: requeue of job $2 asked from the container; the batch script makes it" >&2
    exit 0
fi
here=$(cd "${0%/*}" && pwd)
IFS=:
for dir in $PATH; do
    [ "$dir" = "$here" ] && continue
    [ -x "$dir/scontrol" ] && exec "$dir/scontrol" "$@"
done
echo "scontrol: not in this container (hpc-jobs relays only 'scontrol requeue ID')" >&2
exit 1
"""


def enter(argv: Sequence[str]) -> int:
    """Inside the container: put the scontrol relay first on PATH, then exec ``argv``."""
    if not argv:
        print("usage: python -m hpc_jobs.container enter COMMAND [ARGS...]", file=sys.stderr)
        return 2
    run_dir, stage = os.environ.get("HPC_JOBS_RUN_DIR"), os.environ.get("HPC_JOBS_STAGE")
    if run_dir and stage:
        relay_dir = Path(run_dir) / "stages" / stage / RELAY_DIR
        script = relay_dir / "scontrol"
        try:
            if not script.is_file() or script.read_text() != RELAY_SCRIPT:
                relay_dir.mkdir(parents=True, exist_ok=True)
                tmp = relay_dir / f".scontrol.{os.getpid()}"
                tmp.write_text(RELAY_SCRIPT)
                tmp.chmod(0o755)
                os.replace(tmp, script)  # several ranks may write it at once: each rename is whole
        except OSError as exc:
            print(f"[hpc-jobs] cannot write the scontrol relay in {relay_dir}: {exc}; "
                  "a requeue from this container needs the image's own scontrol", file=sys.stderr, flush=True)
        else:
            os.environ["PATH"] = f"{relay_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execvp(argv[0], list(argv))
    return 127  # not reached


def write_oci_bundle(image: str, bundle: str, cwd: str, binds: Sequence[str], env: Sequence[str]) -> Path:
    """The stage's OCI bundle from ``image`` (a bundle: config.json + rootfs), written atomically.

    Slurm 22.05 runs ``BUNDLE/rootfs`` whatever ``root.path`` says, and runc refuses a symlinked
    rootfs, so the stage's rootfs is a skeleton of mount points: each top-level directory and file
    of the image's rootfs is bind-mounted there (its symlinks copied), then the image's own mounts,
    then the binds. The working directory and environment are set; the rest of the image's
    config.json (user, namespaces, hooks) is kept."""
    source = Path(image)
    with open(source / "config.json") as fh:
        config = json.load(fh)
    root = config.setdefault("root", {})
    image_rootfs = Path(root.get("path") or "rootfs")
    image_rootfs = image_rootfs if image_rootfs.is_absolute() else (source / image_rootfs).resolve()
    root["path"] = "rootfs"
    out = Path(bundle)
    skeleton = out / "rootfs"
    if skeleton.is_symlink():
        skeleton.unlink()
    skeleton.mkdir(parents=True, exist_ok=True)
    mounts: List[Dict[str, Any]] = []
    own = [m for m in config.get("mounts", []) if isinstance(m, dict)]
    covered = {m.get("destination") for m in own}
    for entry in sorted(os.scandir(image_rootfs), key=lambda e: e.name):
        point = skeleton / entry.name
        if entry.is_symlink():
            if not (point.is_symlink() and os.readlink(point) == os.readlink(entry.path)):
                _replace_symlink(point, os.readlink(entry.path))
            continue
        if entry.name in ("proc", "sys", "dev"):  # the kernel's, from the image's mounts
            point.mkdir(exist_ok=True)
            continue
        if entry.is_dir():
            point.mkdir(exist_ok=True)
        elif not point.exists():
            point.touch()
        if "/" + entry.name not in covered:
            mounts.append({"destination": "/" + entry.name, "type": "bind", "source": entry.path, "options": ["rbind"]})
    mounts += own
    for bind in binds:
        src, dst, ro = parse_bind(bind, "oci-bundle")
        mounts = [m for m in mounts if m.get("destination") != dst]
        mounts.append({"destination": dst, "type": "bind", "source": src,
                       "options": ["rbind", "ro"] if ro else ["rbind"]})
    config["mounts"] = mounts
    process = config.setdefault("process", {})
    process["cwd"] = cwd
    entries = [e for e in process.get("env", []) if isinstance(e, str)]
    for item in env:
        key = item.split("=", 1)[0]
        entries = [e for e in entries if e.split("=", 1)[0] != key] + [item]
    process["env"] = entries
    tmp = out / f".config.json.{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(tmp, out / "config.json")  # tasks on several nodes may write it at once: each rename is whole
    return out


def _replace_symlink(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "enter":
        return enter(args[1:])
    if args and args[0] == "oci-bundle":
        import argparse

        p = argparse.ArgumentParser(prog="python -m hpc_jobs.container oci-bundle")
        p.add_argument("image")
        p.add_argument("bundle")
        p.add_argument("--cwd", required=True)
        p.add_argument("--bind", action="append", default=[])
        p.add_argument("--env", action="append", default=[])
        ns = p.parse_args(args[1:])
        try:
            write_oci_bundle(ns.image, ns.bundle, ns.cwd, ns.bind, ns.env)
        except (OSError, ValueError, UserError) as exc:
            print(f"error: OCI bundle {ns.bundle} from {ns.image}: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m hpc_jobs.container enter CMD... | oci-bundle IMAGE BUNDLE --cwd DIR [--bind B]... [--env K=V]...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
