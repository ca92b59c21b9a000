"""demo: the smallest pipeline that shows every mechanism, in one file.

``fetch`` (login node) writes a noisy line y = a*x + b; ``shard`` (an array of 3 tasks) computes
per-shard sums; ``train`` fits the line by gradient descent and checkpoints; ``train_more``
*resumes* that training (same step counter, same state) for more epochs; ``evaluate`` *inits* from
the final weights and reports the error. Runs in seconds anywhere: a first pipeline to read, and
the test bed of the core (``--set fail_once=STAGE`` makes a stage fail on its first attempt, so
``resume`` can be seen rerunning only what failed).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register


@dataclass
class DemoConfig:
    points: int = 300
    slope: float = 3.0
    intercept: float = 1.0
    noise: float = 0.1
    epochs: int = 20
    more_epochs: int = 20
    lr: float = 0.5
    shards: int = 3
    seed: int = 0
    fail_once: str = ""  # fault injection: this stage (STAGE, or STAGE:TASK) fails on its first attempt
    sleep_s: float = 0.0  # make train slow enough to watch or interrupt


def maybe_fail_once(ctx, spec: str) -> None:
    """Fault injection for the examples and the tests: ``spec`` "STAGE" or "STAGE:TASK" makes that
    stage (task) raise on its first attempt only, so a resume completes it."""
    stage, _, task = spec.partition(":")
    if stage == ctx.stage and (not task or int(task) == ctx.task_index):
        flag = ctx.out_dir / ".failed_once"
        if not flag.exists():
            flag.write_text("1")
            where = ctx.stage if ctx.task_index is None else f"{ctx.stage} task {ctx.task_index}"
            raise RuntimeError(f"injected failure in stage {where} (fail_once)")


def fetch(ctx):
    cfg = ctx.config
    rng = random.Random(cfg.seed)
    xs = [rng.uniform(-1, 1) for _ in range(cfg.points)]
    ys = [cfg.slope * x + cfg.intercept + rng.gauss(0, cfg.noise) for x in xs]
    path = ctx.output("points")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"x": xs, "y": ys}))
    maybe_fail_once(ctx, ctx.config.fail_once)
    return {"points": len(xs)}


def shard(ctx):
    data = json.loads(ctx.inputs["points"].read_text())
    n, k = len(data["x"]), ctx.task_index
    lo, hi = k * n // ctx.num_tasks, (k + 1) * n // ctx.num_tasks
    xs, ys = data["x"][lo:hi], data["y"][lo:hi]
    stats = {"n": len(xs), "x": sum(xs), "y": sum(ys), "xx": sum(x * x for x in xs), "xy": sum(x * y for x, y in zip(xs, ys))}
    out = ctx.output("stats")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stats))
    maybe_fail_once(ctx, ctx.config.fail_once)
    return stats


def _gradient_descent(stats, w, b, epochs, lr):
    n = sum(s["n"] for s in stats)
    sx, sy = sum(s["x"] for s in stats), sum(s["y"] for s in stats)
    sxx, sxy = sum(s["xx"] for s in stats), sum(s["xy"] for s in stats)
    for _ in range(epochs):
        gw = 2 * (w * sxx + b * sx - sxy) / n
        gb = 2 * (w * sx + b * n - sy) / n
        w, b = w - lr * gw, b - lr * gb
    return w, b


def _train(ctx, state, epochs):
    import time

    from hpc_jobs.checkpoint import save_checkpoint

    stats = [json.loads(p.read_text()) for p in ctx.inputs["stats"]] if "stats" in ctx.inputs else state["stats"]
    w, b, step = state.get("w", 0.0), state.get("b", 0.0), state.get("step", 0)
    for _ in range(epochs):
        w, b = _gradient_descent(stats, w, b, 1, ctx.config.lr)
        step += 1
        if ctx.config.sleep_s:
            time.sleep(ctx.config.sleep_s)
    maybe_fail_once(ctx, ctx.config.fail_once)
    out = ctx.output("checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(out), {"w": w, "b": b, "step": step, "stats": stats}, step=step, epoch=step, metrics={"w": w, "b": b})
    return {"step": step, "w": w, "b": b}


def train(ctx):
    return _train(ctx, {}, ctx.config.epochs)


def train_more(ctx):
    from hpc_jobs.checkpoint import load_checkpoint

    state = load_checkpoint(str(ctx.inputs["checkpoint"]))  # resume: every field, step counter included
    return _train(ctx, state, ctx.config.more_epochs)


def evaluate(ctx):
    from hpc_jobs.checkpoint import load_checkpoint

    state = load_checkpoint(str(ctx.inputs["weights"]))
    weights = {"w": state["w"], "b": state["b"]}  # init: weights only
    cfg = ctx.config
    err = abs(weights["w"] - cfg.slope) + abs(weights["b"] - cfg.intercept)
    result = {"abs_error": err, "w": weights["w"], "b": weights["b"], "steps": state["step"]}
    (ctx.out_dir / "metrics.json").write_text(json.dumps(result))
    maybe_fail_once(ctx, ctx.config.fail_once)
    return result


@register
class Demo(Workflow):
    name = "demo"
    summary = "a 5-stage toy pipeline (login, array of 3, train -> resume -> init eval); runs in seconds"
    Config = DemoConfig
    sweep_from = "train"  # --sweep lr=0.1,0.5: fetch and shard run once, train -> evaluate once per point
    sweep_metric, sweep_mode = "abs_error", "min"

    def build(self) -> Pipeline:
        cfg = self.config
        # 1G, not less: saving or loading a checkpoint imports torch (about 510 MB resident), and a
        # cluster that enforces --mem by accounting (the dev cluster) kills a job sampled above it
        small = Resources(cpus_per_task=1, mem="1G", time="00:10:00")
        return Pipeline(self.name, [
            Stage("fetch", fetch, where="login", outputs={"points": "points.json"}),
            Stage("shard", shard, resources=small, array=cfg.shards, array_parallelism=2,
                  inputs={"points": Input("fetch", "points")}, outputs={"stats": "stats/{task}.json"}),
            Stage("train", train, resources=small, inputs={"stats": Input("shard", "stats")},
                  outputs={"checkpoint": "checkpoints/last.pt"}),
            Stage("train_more", train_more, resources=small,
                  inputs={"checkpoint": Input("train", "checkpoint", kind="resume")},
                  outputs={"checkpoint": "checkpoints/last.pt"}),
            Stage("evaluate", evaluate, resources=small,
                  inputs={"weights": Input("train_more", "checkpoint", kind="init")},
                  outputs={"metrics": "metrics.json"}),
        ])
