"""``hpc-jobs new WORKFLOW [--dir DIR]``: a one-file workflow skeleton that launches as it is.

The file has a config dataclass, three stages (``prepare`` -> ``train`` -> ``evaluate``, the last
starting from the trained weights: an ``init`` handoff) and a ``tiny`` preset, and needs nothing
but the core: its checkpoints go through :func:`hpc_jobs.checkpoint.save_checkpoint`, which uses
torch when it is installed and a plain pickle when it is not. It is found through
``HPC_JOBS_LAUNCHERS`` (a path works: ``HPC_JOBS_LAUNCHERS=./NAME.py``), or by an entry point once
it lives in a package of its own (docs/writing-a-workflow.md).
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

from .errors import UserError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

TEMPLATE = '''\
"""{name}: a workflow made by `hpc-jobs new {name}`; edit the stages, keep the shape.

prepare (a batch job) writes a data set; train fits y = w * x + b and checkpoints; evaluate starts
from train's weights (an init handoff: weights only) and reports the error.

Launch it (HPC_JOBS_LAUNCHERS names this file; its code is copied into each run):

    HPC_JOBS_LAUNCHERS={path} hpc-jobs {name} --cluster local
    HPC_JOBS_LAUNCHERS={path} hpc-jobs {name} --cluster devcluster --follow
    HPC_JOBS_LAUNCHERS={path} hpc-jobs {name} --help      # options and config keys

Import heavy libraries (torch, ...) inside the stage functions, never at the top of this file:
launching imports it and must stay instant.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register
from hpc_jobs.checkpoint import load_checkpoint, save_checkpoint


@dataclass
class {cls}Config:
    points: int = 10000       # size of the generated data set
    epochs: int = 200
    lr: float = 0.5
    seed: int = 0
    time: str = "01:00:00"    # time limit of each batch stage
    mem: str = "4G"


def prepare(ctx):
    cfg = ctx.config
    rng = random.Random(cfg.seed)
    xs = [rng.uniform(-1, 1) for _ in range(cfg.points)]
    data = {{"x": xs, "y": [3.0 * x + 1.0 + rng.gauss(0, 0.1) for x in xs]}}
    ctx.output("data").write_text(json.dumps(data))
    return {{"points": cfg.points}}


def train(ctx):
    cfg = ctx.config
    data = json.loads(ctx.inputs["data"].read_text())
    xs, ys, n = data["x"], data["y"], len(data["x"])
    w = b = 0.0
    for _ in range(cfg.epochs):
        gw = sum(2 * (w * x + b - y) * x for x, y in zip(xs, ys)) / n
        gb = sum(2 * (w * x + b - y) for x, y in zip(xs, ys)) / n
        w, b = w - cfg.lr * gw, b - cfg.lr * gb
    loss = sum((w * x + b - y) ** 2 for x, y in zip(xs, ys)) / n
    save_checkpoint(ctx.output("checkpoint"), {{"w": w, "b": b}}, step=cfg.epochs, epoch=cfg.epochs,
                    metrics={{"loss": loss}})
    return {{"loss": loss}}


def evaluate(ctx):
    state = load_checkpoint(ctx.inputs["weights"])  # verified against its manifest first
    error = abs(state["w"] - 3.0) + abs(state["b"] - 1.0)
    ctx.output("metrics").write_text(json.dumps({{"abs_error": error}}))
    return {{"abs_error": error}}


@register
class {cls}(Workflow):
    name = "{name}"
    summary = "prepare -> train -> evaluate (init from train's weights): a skeleton to edit"
    Config = {cls}Config
    # 1G: saving or loading a checkpoint imports torch (about 510 MB resident)
    presets = {{"tiny": {{"points": 200, "epochs": 50, "time": "00:10:00", "mem": "1G"}}}}
    default_preset = "tiny"

    def build(self) -> Pipeline:
        cfg = self.config
        res = Resources(cpus_per_task=1, mem=cfg.mem, time=cfg.time)
        return Pipeline(self.name, [
            Stage("prepare", prepare, resources=res, outputs={{"data": "data.json"}}),
            Stage("train", train, resources=res, inputs={{"data": Input("prepare", "data")}},
                  outputs={{"checkpoint": "checkpoints/last.pt"}}),
            Stage("evaluate", evaluate, resources=res,
                  inputs={{"weights": Input("train", "checkpoint", kind="init")}},
                  outputs={{"metrics": "metrics.json"}}),
        ])
'''


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        raise UserError(f"new: '{name}' is not a workflow name: lower-case letters, digits and _, starting with a "
                        f"letter (it is also the module's name)")
    if importlib.util.find_spec(name) is not None:
        raise UserError(f"new: '{name}' is already an importable module ({importlib.util.find_spec(name).origin}); "
                        f"choose another name")


def write(name: str, directory: Path, force: bool = False) -> Path:
    """Write ``DIRECTORY/NAME.py``; return its path."""
    from . import workflow as wfmod

    check_name(name)
    if name in wfmod.discover():
        raise UserError(f"new: a workflow named '{name}' exists already ({wfmod.source(name)}); choose another name")
    directory = directory.expanduser().resolve()
    path = directory / f"{name}.py"
    if path.exists() and not force:
        raise UserError(f"new: {path} exists (--force overwrites it)")
    directory.mkdir(parents=True, exist_ok=True)
    cls = "".join(part.capitalize() for part in name.split("_") if part) or name.capitalize()
    shown = f"./{path.name}" if directory == Path.cwd().resolve() else str(path)
    path.write_text(TEMPLATE.format(name=name, cls=cls, path=shown))
    return path
