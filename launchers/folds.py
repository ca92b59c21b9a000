"""folds: the array features of the core in a pipeline that runs in seconds, in one file.

``fetch`` (login node) writes a noisy line y = a*x + b cut into K folds; ``fit`` is an array of K
tasks: task k fits the line on the other folds, validates on fold k and checkpoints every epoch
into its own directory; ``refine`` is a second array whose task k starts from **task k's best
checkpoint** of ``fit`` (a per-task ``init`` handoff: a Slurm aftercorr edge); ``gather`` waits for
every task and averages the K models; ``publish`` is a login step in the middle of the pipeline
(where compute nodes have no internet it runs on the login node once ``gather`` is done); and
``summary`` reads what was published. ``--set fail_once=fit:1`` makes task 1 of ``fit`` fail on its
first attempt, so ``resume`` can be seen rerunning that one task and what depends on it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from hpc_jobs import BestCheckpoint, Input, Pipeline, Resources, Stage, Workflow, register
from launchers.demo import maybe_fail_once


@dataclass
class FoldsConfig:
    folds: int = 3
    points: int = 240
    slope: float = 3.0
    intercept: float = 1.0
    noise: float = 0.2
    epochs: int = 12
    refine_epochs: int = 6
    lr: float = 0.3
    seed: int = 0
    fail_once: str = ""  # "STAGE" or "STAGE:TASK": fails on its first attempt
    sleep_s: float = 0.0  # slow every epoch down (to watch, cancel or interrupt a task)


def fetch(ctx):
    cfg = ctx.config
    rng = random.Random(cfg.seed)
    xs = [rng.uniform(-1, 1) for _ in range(cfg.points)]
    ys = [cfg.slope * x + cfg.intercept + rng.gauss(0, cfg.noise) for x in xs]
    path = ctx.output("points")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"x": xs, "y": ys, "fold": [i % cfg.folds for i in range(len(xs))]}))
    return {"points": len(xs)}


def _mse(w: float, b: float, pts) -> float:
    return sum((w * x + b - y) ** 2 for x, y in pts) / max(1, len(pts))


def _train(ctx, w: float, b: float, epochs: int, lr: float, first_step: int):
    """Gradient descent on the other folds, a validated checkpoint per epoch in this task's dir."""
    import time

    from hpc_jobs.checkpoint import save_checkpoint

    data = json.loads(ctx.inputs["points"].read_text())
    k = ctx.task_index
    train = [(x, y) for x, y, f in zip(data["x"], data["y"], data["fold"]) if f != k]
    val = [(x, y) for x, y, f in zip(data["x"], data["y"], data["fold"]) if f == k]
    ckpt_dir = ctx.output("best")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    step = first_step
    for _ in range(epochs):
        n = len(train)
        gw = sum(2 * (w * x + b - y) * x for x, y in train) / n
        gb = sum(2 * (w * x + b - y) for x, y in train) / n
        w, b, step = w - lr * gw, b - lr * gb, step + 1
        val_mse = _mse(w, b, val)
        save_checkpoint(str(ckpt_dir / f"step-{step:08d}.pt"), {"w": w, "b": b, "step": step}, step=step,
                        epoch=step, metrics={"val_mse": val_mse})
        ctx.heartbeat(step=step - first_step, total_steps=epochs, loss=val_mse)
        if ctx.config.sleep_s:
            time.sleep(ctx.config.sleep_s)
    maybe_fail_once(ctx, ctx.config.fail_once)
    return {"fold": k, "w": w, "b": b, "val_mse": _mse(w, b, val), "step": step}


def fit(ctx):
    return _train(ctx, 0.0, 0.0, ctx.config.epochs, ctx.config.lr, 0)


def refine(ctx):
    from hpc_jobs.checkpoint import load_checkpoint

    start = load_checkpoint(str(ctx.inputs["init"]))  # init: fold k's best weights only
    print(f"fold {ctx.task_index}: init from {ctx.inputs['init']} (step {start['step']})", flush=True)
    return _train(ctx, start["w"], start["b"], ctx.config.refine_epochs, ctx.config.lr / 3, start["step"])


def gather(ctx):
    from hpc_jobs.checkpoint import load_checkpoint
    from hpc_jobs.fsutil import atomic_write_json

    models = [load_checkpoint(str(p)) for p in ctx.inputs["models"]]  # every fold's best, in task order
    w = sum(m["w"] for m in models) / len(models)
    b = sum(m["b"] for m in models) / len(models)
    cfg = ctx.config
    result = {"folds": len(models), "w": w, "b": b, "abs_error": abs(w - cfg.slope) + abs(b - cfg.intercept),
              "steps": [m["step"] for m in models]}
    atomic_write_json(ctx.output("metrics"), result)
    maybe_fail_once(ctx, ctx.config.fail_once)
    return result


def publish(ctx):
    """Stands for a step that needs the internet (an upload, or a download of what a batch stage
    selected): it runs where the network is."""
    import socket

    from hpc_jobs.fsutil import atomic_write_json

    metrics = json.loads(ctx.inputs["metrics"].read_text())
    atomic_write_json(ctx.output("published"), {**metrics, "published_from": socket.gethostname()})
    return {"published": str(ctx.output("published"))}


def summary(ctx):
    data = json.loads(ctx.inputs["published"].read_text())
    maybe_fail_once(ctx, ctx.config.fail_once)
    return {"abs_error": data["abs_error"], "folds": data["folds"]}


@register
class Folds(Workflow):
    name = "folds"
    summary = "a K-fold toy pipeline: training array, per-task init from each fold's best, gather, mid-pipeline login step"
    Config = FoldsConfig

    def build(self) -> Pipeline:
        cfg = self.config
        # 1G, not less: saving or loading a checkpoint imports torch (about 510 MB resident), and a
        # cluster that enforces --mem by accounting (the dev cluster) kills a job sampled above it
        small = Resources(cpus_per_task=1, mem="1G", time="00:10:00")
        best = BestCheckpoint("checkpoints", metric="val_mse", mode="min")
        return Pipeline(self.name, [
            Stage("fetch", fetch, where="login", outputs={"points": "points.json"}),
            Stage("fit", fit, resources=small, array=cfg.folds, inputs={"points": Input("fetch", "points")},
                  outputs={"best": best}, description="fold k: train on the others, validate on k"),
            Stage("refine", refine, resources=small, array=cfg.folds,
                  inputs={"init": Input("fit", "best", kind="init", per_task=True),
                          "points": Input("fetch", "points")},
                  outputs={"best": best}, description="fold k again, from fit's best checkpoint of fold k"),
            Stage("gather", gather, resources=small, inputs={"models": Input("refine", "best", kind="init")},
                  outputs={"metrics": "metrics.json"}),
            Stage("publish", publish, where="login", inputs={"metrics": Input("gather", "metrics")},
                  outputs={"published": "published.json"}),
            Stage("summary", summary, resources=small, inputs={"published": Input("publish", "published")},
                  outputs={}),
        ])
