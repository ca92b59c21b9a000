"""faultlab: a tiny engine-trained regression for the fault-injection suite (tests/integration/test_faults*.py).

    prepare (CPU job: a noisy linear target, pure Python) -> train (Trainer: MLP, checkpoints every
    ``checkpoint_every`` steps) -> evaluate (inits from train's final checkpoint: ``Input(kind="init")``)

Every knob that injects a fault or slows the run down leaves the arithmetic alone: ``step_sleep_s``
sleeps inside each training step, ``ballast_mb`` adds task state to every checkpoint (so its write
takes a while), ``fail_once`` fails a stage on its first attempt. Runs that differ only in those
knobs therefore end with bit-identical weights, which is how the tests prove exact resume.

The train stage leaves a trail the tests read: ``trail.jsonl`` (rank 0: a ``start`` line per
process start with the step it resumes from, a ``first_step`` line when it trains again and a
``first_step_done`` line when that step has updated the weights (its next step begins), a
``stop``/``done`` line at the end) and
``ranks/rank<R>.json`` (pid and node of every rank, for killing one).
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register
from hpc_jobs.errors import UserError
from launchers.demo import maybe_fail_once


@dataclass
class FaultLabConfig:
    samples: int = 192
    features: int = 6
    hidden: int = 16
    noise: float = 0.05
    batch_size: int = 8          # 192 / 8 = 24 optimizer steps per epoch
    epochs: int = 5              # 120 steps in all
    lr: float = 0.01
    seed: int = 0
    checkpoint_every: int = 10   # optimizer steps between periodic checkpoints
    keep_last: int = 2
    step_sleep_s: float = 0.0    # sleep in every training step: signals land mid-training
    ballast_mb: float = 0.0      # extra task state saved in every checkpoint: a slow checkpoint write
    fail_once: str = ""          # this stage raises on its first attempt
    late_signal: bool = False    # train sends itself the requeue signal (USR2) while its process exits
    init_from: str = ""          # train starts from these weights (a checkpoint path; weights only)
    use_gpus: bool = False       # ask Slurm for --gpus GRES on train (the devcluster's fake GPUs)
    downstream: bool = True      # add the evaluate stage
    train_time: str = "00:10:00"
    max_requeues: int = 20

    def validate(self) -> None:
        if self.init_from:
            path = Path(self.init_from).expanduser()
            if not path.is_file():
                raise UserError(f"init_from '{self.init_from}' is not a file: pass a checkpoint path "
                                "(e.g. RUN/stages/train/checkpoints/last.pt) or leave it empty")
            from hpc_jobs.checkpoint import CheckpointError, manifest_path, verify_checkpoint

            if manifest_path(path).exists():  # an engine checkpoint: must be complete (no torch needed)
                try:
                    verify_checkpoint(path, quick=True)
                except CheckpointError as exc:
                    raise UserError(f"init_from: {exc}") from None


def prepare(ctx) -> Dict[str, Any]:
    cfg = ctx.config
    rng = random.Random(cfg.seed)
    w = [rng.uniform(-1, 1) for _ in range(cfg.features)]
    xs = [[rng.gauss(0, 1) for _ in range(cfg.features)] for _ in range(cfg.samples)]
    ys = [sum(a * b for a, b in zip(w, x)) + rng.gauss(0, cfg.noise) for x in xs]
    out = ctx.output("data")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"x": xs, "y": ys}))
    maybe_fail_once(ctx, ctx.config.fail_once)
    return {"samples": len(xs)}


class RegressionTask:
    """The engine's TrainTask: MLP regression on prepare's data."""

    def __init__(self, cfg: FaultLabConfig, data_path: Path, trail: Path | None = None):
        self.cfg, self.data_path = cfg, Path(data_path)
        self.trail = trail  # rank 0: note when this process trains its first step
        self.ballast = None
        if cfg.ballast_mb > 0:
            import torch

            self.ballast = torch.zeros(int(cfg.ballast_mb * 2**20) // 4)

    def build_model(self):
        return build_model(self.cfg)

    def train_dataset(self):
        import torch
        from torch.utils.data import TensorDataset

        data = json.loads(self.data_path.read_text())
        return TensorDataset(torch.tensor(data["x"]), torch.tensor(data["y"]).unsqueeze(1))

    def training_step(self, model, batch):
        import torch.nn.functional as F

        if self.trail is not None:  # this process's first step begins; at its second, the first is done
            self.steps_here = getattr(self, "steps_here", 0) + 1
            _append(self.trail, {"event": "first_step" if self.steps_here == 1 else "first_step_done",
                                 "pid": os.getpid()})
            if self.steps_here == 2:
                self.trail = None
        if self.cfg.step_sleep_s:
            time.sleep(self.cfg.step_sleep_s)
        x, y = batch
        return F.mse_loss(model(x), y)

    def state_dict(self) -> dict:
        return {"ballast": self.ballast} if self.ballast is not None else {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_model(cfg: FaultLabConfig):
    from torch import nn

    return nn.Sequential(nn.Linear(cfg.features, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 1))


def engine_config(cfg: FaultLabConfig):
    from hpc_jobs.engine import TrainConfig

    # one thread, no loader workers: the arithmetic is the same here, under the local backend and
    # in a Slurm job, so runs compare bit for bit
    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       checkpoint_every_steps=cfg.checkpoint_every, keep_last=cfg.keep_last, log_every=10,
                       num_workers=0, num_threads=1, device="cpu", precision="fp32", heartbeat_every_s=0.0,
                       tensorboard=False, plot=False)


def _append(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": time.time(), **record}) + "\n")


def train(ctx) -> Dict[str, Any]:
    from hpc_jobs.checkpoint import latest_complete, read_manifest
    from hpc_jobs.engine import Interrupted, Trainer

    cfg, env = ctx.config, ctx.env
    rank = env.rank if env is not None else 0
    restart = env.restart_count if env is not None else 0
    (ctx.out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "ranks" / f"rank{rank}.json").write_text(json.dumps({
        "pid": os.getpid(), "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "restart": restart, "job_id": env.job_id if env is not None else None}))
    trail = ctx.out_dir / "trail.jsonl"
    if rank == 0:
        own = latest_complete(ctx.out_dir / "checkpoints")
        _append(trail, {"event": "start", "restart": restart, "job_id": env.job_id if env else None,
                           "pid": os.getpid(), "from_step": read_manifest(own).step if own else 0,
                           "from": own.name if own else None, "code": __file__})
    maybe_fail_once(ctx, ctx.config.fail_once)
    task = RegressionTask(cfg, ctx.inputs["data"], trail if rank == 0 else None)
    init = cfg.init_from or None
    try:
        result = Trainer(task, engine_config(cfg), ctx.out_dir, env=env, init_from=init).fit()
    except Interrupted as exc:
        if rank == 0:
            _append(trail, {"event": "stop", "kind": type(exc).__name__, "step": exc.step,
                               "checkpoint": exc.checkpoint.name, "requeued": exc.requeued})
        raise
    if rank == 0:
        _append(trail, {"event": "done", "step": result["step"]})
    if cfg.late_signal:  # as when the time-limit warning reaches a job that has just finished
        atexit.register(_signal_myself)
    return {"step": result["step"], "train_loss": result["train_loss"],
            "resumed_from": Path(result["resumed_from"]).name if result["resumed_from"] else None}


def _signal_myself() -> None:
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.5)  # let it land while this process is still exiting


def evaluate(ctx) -> Dict[str, Any]:
    import torch

    from hpc_jobs.checkpoint import read_manifest
    from hpc_jobs.engine import load_init_weights

    cfg = ctx.config
    model = build_model(cfg)
    load_init_weights(model, ctx.inputs["weights"])
    data = json.loads(Path(ctx.inputs["data"]).read_text())
    with torch.no_grad():
        pred = model(torch.tensor(data["x"])).squeeze(1)
        mse = float(torch.mean((pred - torch.tensor(data["y"])) ** 2))
    result = {"mse": mse, "step": read_manifest(ctx.inputs["weights"]).step}
    ctx.output("metrics").write_text(json.dumps(result))
    maybe_fail_once(ctx, ctx.config.fail_once)
    return result


@register
class FaultLab(Workflow):
    name = "faultlab"
    summary = "test-only: tiny MLP regression through the engine (prepare -> train -> evaluate) for fault injection"
    Config = FaultLabConfig

    def build(self) -> Pipeline:
        cfg, opts = self.config, self.options
        ranks = max(1, opts.gpus)
        small = Resources(cpus_per_task=1, mem="200M", time="00:05:00")
        with_torch = Resources(cpus_per_task=1, mem="1G", time="00:05:00")  # torch alone is ~270 MB resident
        train_res = Resources(nodes=opts.nodes, gpus_per_node=opts.gpus if cfg.use_gpus else 0,
                              tasks_per_node=ranks, cpus_per_task=1, mem="2G", time=cfg.train_time)
        stages = [
            Stage("prepare", prepare, resources=small, outputs={"data": "data.json"}),
            Stage("train", train, resources=train_res, inputs={"data": Input("prepare", "data")},
                  outputs={"last": "checkpoints/last.pt"}, max_requeues=cfg.max_requeues),
        ]
        if cfg.downstream:
            stages.append(Stage("evaluate", evaluate, resources=with_torch,
                                inputs={"weights": Input("train", "last", kind="init"),
                                        "data": Input("prepare", "data")},
                                outputs={"metrics": "metrics.json"}))
        return Pipeline(self.name, stages)
