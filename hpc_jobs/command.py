"""``python launch.py run [options] -- CMD ARGS...``: your own script as a one-stage pipeline.

What ``sbatch --wrap`` or submitit's ``executor.submit`` give, plus the rest of hpc-jobs: the run
ledger (command, git SHA, code snapshot), ``status``/``logs``/``cancel``/``resume``, the profile's
module/conda lines, the sbatch options of a launch, and a requeue on the time limit.

The command runs in the directory it was launched from, with (besides Slurm's own variables):

- ``HPC_JOBS_CHECKPOINT_DIR``: a directory kept across requeues and resumes; write checkpoints
  there and resume from the newest one at start;
- ``HPC_JOBS_RESTART_COUNT``: 0 on the first start, then 1, 2, ... after each requeue;
- ``HPC_JOBS_SIGNAL``: the signal sent before the time limit (USR2 by default, ``signal_lead_s``
  of the profile ahead). The command receives it: checkpoint and exit. The job is then requeued
  and the command starts again (``HPC_JOBS_RESTART_COUNT`` + 1);
- ``HPC_JOBS_OUT_DIR``, ``HPC_JOBS_RUN_DIR``; with several ranks (``--nodes``, ``--stage-set
  cmd.tasks_per_node=N``) also ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT`` for ``torch.distributed`` (``init_method="env://"``).

One task per node by default (your script starts its own processes, as with ``sbatch --wrap``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import List

from .errors import UserError, command
from .spec import Pipeline, Resources, Stage
from .workflow import Workflow, register


@dataclass
class CommandConfig:
    command: List[str] = field(default_factory=list)  # the program and its arguments, as typed after --
    workdir: str = ""  # where it runs (the launch directory)


class CommandFailed(RuntimeError):
    """The command exited non-zero."""


def run_command(ctx):
    from .environment import RunEnv
    from .interrupts import Requeued, Terminated

    cfg = ctx.config
    env: RunEnv = ctx.env
    ckpt = ctx.out_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ)
    child_env.update(HPC_JOBS_CHECKPOINT_DIR=str(ckpt), HPC_JOBS_OUT_DIR=str(ctx.out_dir),
                     HPC_JOBS_RUN_DIR=str(ctx.run_dir), HPC_JOBS_RESTART_COUNT=str(env.restart_count))
    child_env.setdefault("HPC_JOBS_SIGNAL", "USR2")
    if env.world_size > 1:
        child_env.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                         MASTER_ADDR=str(env.master_addr), MASTER_PORT=str(env.master_port))
    name = child_env["HPC_JOBS_SIGNAL"].upper().removeprefix("SIG")
    requeue_sig = getattr(signal, "SIG" + name, signal.SIGUSR2)
    started = time.time()
    print(f"[hpc_jobs] running {' '.join(cfg.command)} in {cfg.workdir} (checkpoints: {ckpt}; "
          f"restart {env.restart_count})", flush=True)
    proc = subprocess.Popen(cfg.command, cwd=cfg.workdir or None, env=child_env, start_new_session=True)
    received: List[int] = []

    def forward(signum, _frame):  # the script checkpoints on it; we requeue once it has exited
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (requeue_sig, signal.SIGTERM)}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if requeue_sig in received:
        cause = env.stop_cause() if env.is_slurm and env.is_main else None
        requeued = env.requeue() if env.is_slurm and env.is_main else False
        raise Requeued(f"{' '.join(cfg.command)} exited {code} after the requeue signal"
                       + ("; requeued" if requeued else "; not requeued (not under Slurm)"),
                       step=None, epoch=None, checkpoint=ckpt, signal=requeue_sig, requeued=requeued, cause=cause)
    if signal.SIGTERM in received:
        raise Terminated(f"{' '.join(cfg.command)} terminated (exit {code})", step=None, epoch=None,
                         checkpoint=ckpt, signal=signal.SIGTERM)
    if code != 0:
        raise CommandFailed(f"{' '.join(cfg.command)} exited with code {code}")
    return {"exit_code": code, "seconds": round(time.time() - started, 1)}


@register
class Command(Workflow):
    name = "run"
    summary = "your own command as a one-stage pipeline: python launch.py run [--gpus N --time T ...] -- CMD ARGS"
    Config = CommandConfig

    def build(self) -> Pipeline:
        cfg, opts = self.config, self.options
        if not cfg.command:
            raise UserError(f"run: give the command after --, e.g. {command()} run --gpus 1 -- python train.py --lr 1e-3")
        gpus = opts.gpus if opts.gpus_given else 0
        res = Resources(nodes=opts.nodes, gpus_per_node=gpus, tasks_per_node=1, cpus_per_task=max(1, 4 * gpus) if gpus else 1,
                        mem="8G" if gpus else "2G", time="01:00:00")
        return Pipeline(self.name, [Stage("cmd", run_command, resources=res, outputs={"checkpoints": "checkpoints"},
                                          kind="gpu" if gpus else "cpu", description=" ".join(cfg.command))])
