"""Trainer: the one training loop every workflow runs through.

Order of events (every rank runs the same code; world size 1 simply has no process group):

1. devices and process group, precision, seeds; ``build_model`` -> ``init_from`` weights ->
   optimizer -> datasets -> scheduler -> DDP or DeepSpeed wrapping;
2. resume: the newest complete checkpoint of ``out_dir/checkpoints`` (else ``resume_from``)
   restores weights, optimizer, scheduler, scaler, task state, RNG of every rank, best metric and
   the position (epoch, micro-batches done) -- the data order is a function of (seed, epoch), so
   the batches already seen are skipped without being loaded and the run continues bit-identically;
3. per optimizer step: ``training_step`` on ``grad_accum`` micro-batches (autocast, no_sync),
   optimizer and scheduler step, progress line / metrics row every ``log_every`` steps, heartbeat,
   checkpoint every ``checkpoint_every_steps``, and a check (agreed by all ranks) of the signal flag;
4. per epoch end: validation, ``step-N.pt`` (+ manifest), ``last.pt``, ``best.pt`` when the best
   metric improved, pruning, ``losses.png``.

A requeue signal (USR2) or SIGTERM makes the loop save a checkpoint at the next step boundary and
raise ``Requeued`` (after ``scontrol requeue`` under Slurm) or ``Terminated``; their ``exit_code``
tells the job bootstrap how to exit.

Checkpoints: ``out_dir/checkpoints/step-{step:08d}.pt`` (+ manifest; DeepSpeed shards in
``step-{step:08d}.ds/`` listed in it), ``last.pt`` and ``best.pt`` as links. A manifest's ``epoch``
is the number of completed epochs, or the epoch in progress when ``meta["batch_in_epoch"]`` > 0.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from hpc_jobs.checkpoint import (CheckpointError, latest_complete, link_checkpoint, load_checkpoint, prune,
                                 save_checkpoint, verify_checkpoint)
from hpc_jobs.engine.config import TrainConfig, resolve_precision
from hpc_jobs.engine.data import EpochSampler, build_loader, sample_seed
from hpc_jobs.engine.distributed import (Distributed, get_rng_state, seed_everything, select_device,
                                         set_rng_state)
from hpc_jobs.engine.outputs import Heartbeat, MetricsCSV, TensorBoard, format_duration, plot_losses
from hpc_jobs.engine.signals import REQUEUE, StopFlag
from hpc_jobs.engine.strategy import autocast, make_strategy
from hpc_jobs.engine.weights import load_init_weights
from hpc_jobs.environment import RunEnv
from hpc_jobs.interrupts import Interrupted, Requeued, Terminated  # noqa: F401  (re-exported)

STATE_FORMAT = 1
REQUIRED_TASK_METHODS = ("build_model", "train_dataset", "training_step")


@dataclass
class _Position:
    epoch: int = 0   # epoch in progress (= epochs completed when batch == 0)
    batch: int = 0   # micro-batches of that epoch already consumed


def _loss_and_scalars(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    raise TypeError(f"training_step must return the loss tensor or a dict with 'loss'; got {type(out).__name__}")


def _scalar(value: Any) -> float:
    return float(value.detach().float().mean().item()) if isinstance(value, torch.Tensor) else float(value)


class Trainer:
    def __init__(self, task: Any, config: TrainConfig, out_dir: str | os.PathLike, *,
                 env: RunEnv | None = None, init_from: str | os.PathLike | None = None,
                 init_key_map: Callable[[str], str | None] | Mapping[str, str] | None = None,
                 resume_from: str | os.PathLike | None = None) -> None:
        missing = [m for m in REQUIRED_TASK_METHODS if not callable(getattr(task, m, None))]
        if missing:
            raise TypeError(f"{type(task).__name__} is not a TrainTask: it lacks {', '.join(missing)}")
        self.task, self.config = task, config
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.env = env or RunEnv.detect()
        self.init_from = Path(init_from) if init_from else None
        self.init_key_map = init_key_map
        self.resume_from = Path(resume_from) if resume_from else None

    # ------------------------------------------------------------------ public
    def fit(self) -> dict[str, Any]:
        """Train to the end (or ``max_steps``); returns final/best metrics and checkpoint paths.
        Raises ``Requeued``/``Terminated`` after checkpointing when a signal arrives."""
        cfg = self.config
        device = select_device(self.env, cfg.device)
        self.dist = Distributed(self.env, device, force_group=cfg.strategy == "deepspeed",
                                timeout_s=cfg.dist_timeout_s)
        self.metrics_csv = self.tb = self.heartbeat = None
        try:
            with StopFlag(cfg.signal_name) as flag:
                self.flag = flag
                self._setup(device)
                return self._train()
        finally:
            if self.tb is not None:
                self.tb.close()
            self.dist.close()

    # ------------------------------------------------------------------ setup
    def _log(self, message: str) -> None:
        if self.dist.is_main:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {message}", flush=True)

    def _setup(self, device: torch.device) -> None:
        cfg, task, env = self.config, self.task, self.env
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        elif env.is_slurm:
            torch.set_num_threads(max(1, env.cpus_per_task))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.precision = resolve_precision(cfg.precision, device.type, bf16_ok)
        self.device = device

        seed_everything(cfg.seed)  # identical initial weights on every rank and every attempt
        module = task.build_model()
        if self.init_from is not None:
            report = load_init_weights(module, self.init_from, key_map=self.init_key_map,
                                       filter_fn=getattr(task, "filter_init_state", None),
                                       max_mismatch=cfg.init_max_mismatch, min_matched=cfg.init_min_matched)
            self._log(report.summary())
        if cfg.sync_batchnorm and env.world_size > 1:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module.to(device)
        build_optimizer = getattr(task, "build_optimizer", None)
        optimizer = build_optimizer(module) if build_optimizer else torch.optim.AdamW(module.parameters(), lr=cfg.lr)

        self.num_workers = cfg.num_workers if cfg.num_workers is not None else min(8, max(0, env.cpus_per_task - 1))
        collate = getattr(task, "collate_fn", None)
        train_ds = task.train_dataset()
        self.sampler = EpochSampler(train_ds, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                    seed=cfg.seed, drop_last=cfg.drop_last, seed_samples=cfg.seed_samples)
        self.loader_gen = torch.Generator()
        self.train_loader = build_loader(train_ds, batch_size=cfg.batch_size, sampler=self.sampler,
                                         num_workers=self.num_workers, device=device, collate_fn=collate,
                                         drop_last=cfg.drop_last, seed_samples=cfg.seed_samples,
                                         generator=self.loader_gen)
        per_rank = self.sampler.num_samples
        self.batches_per_epoch = per_rank // cfg.batch_size if cfg.drop_last else math.ceil(per_rank / cfg.batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"training set of {len(train_ds)} samples gives {per_rank} per rank on "
                             f"{env.world_size} ranks, fewer than batch_size={cfg.batch_size}: lower the "
                             "batch size or set drop_last=False")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        val_ds = task.val_dataset() if callable(getattr(task, "val_dataset", None)) else None
        self.val_loader = None
        if val_ds is not None and callable(getattr(task, "validate", None)):
            sharded = cfg.validate_on == "all"
            val_sampler = EpochSampler(val_ds, num_replicas=env.world_size if sharded else 1,
                                       rank=env.rank if sharded else 0, shuffle=False, seed=cfg.seed,
                                       drop_last=False, seed_samples=cfg.seed_samples)
            self.val_loader = build_loader(val_ds, batch_size=cfg.batch_size, sampler=val_sampler,
                                           num_workers=self.num_workers, device=device, collate_fn=collate,
                                           drop_last=False, seed_samples=cfg.seed_samples,
                                           generator=torch.Generator().manual_seed(cfg.seed))
        build_scheduler = getattr(task, "build_scheduler", None)
        self.scheduler = build_scheduler(optimizer, self.steps_per_epoch, cfg.epochs) if build_scheduler else None

        self.strategy = make_strategy(self.dist, cfg, self.precision)
        self.strategy.setup(module, optimizer)
        seed_everything(sample_seed(cfg.seed, -1, env.rank) % 2**32)  # per-rank streams (dropout...)

        self.step = 0
        self.position = _Position()
        self.best: dict[str, Any] | None = None
        self.last_val: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self.best_checkpoint: Path | None = None
        self._resumed_accum: tuple[dict[str, torch.Tensor], int] = ({}, 0)
        self.resumed_from = self._resume()

        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics_csv = MetricsCSV(self.out_dir / "metrics.csv")
            self.metrics_csv.truncate_after(self.step)
            if cfg.tensorboard:
                self.tb = TensorBoard(self.out_dir / "tb", purge_step=self.step + 1 if self.resumed_from else None)
            self.heartbeat = Heartbeat(self.out_dir / "heartbeat.json", cfg.heartbeat_every_s,
                                       self.total_steps, cfg.epochs)
        where = f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "from scratch"
        self._log(f"engine: {cfg.strategy} on {env.world_size} rank(s), device {device.type}, precision "
                  f"{self.precision}, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs "
                  f"({self.total_steps} steps), batch {cfg.batch_size}x{cfg.grad_accum}x{env.world_size}; {where}")

    # ------------------------------------------------------------------ resume
    def _find_resume_source(self) -> Path | None:
        own = latest_complete(self.ckpt_dir)
        if own is not None or self.resume_from is None:
            return own
        src = self.resume_from
        if src.is_dir():
            found = latest_complete(src) or latest_complete(src / "checkpoints")
            if found is None:
                raise CheckpointError(f"resume_from={src}: no complete checkpoint in it or in its checkpoints/")
            return found
        verify_checkpoint(src)
        return src

    def _resume(self) -> Path | None:
        cfg = self.config
        source = self.dist.on_main(self._find_resume_source)
        if source is None:
            return None
        source = Path(source)
        own_run = source.parent == self.ckpt_dir
        state = load_checkpoint(source, map_location="cpu", verify=not self.dist.is_main, quick=True)
        saved_strategy = state.get("strategy")
        if saved_strategy != self.strategy.name:
            raise CheckpointError(
                f"{source} was written with strategy={saved_strategy}, this run uses {self.strategy.name}: "
                "optimizer states do not carry over; start from its weights with init_from instead")
        self.strategy.load_checkpoint_state(state, source)
        saved_cfg = state.get("config", {})
        sched_state = state.get("scheduler")
        if self.scheduler is not None and sched_state:
            if saved_cfg.get("epochs") == cfg.epochs and state.get("steps_per_epoch") == self.steps_per_epoch:
                self.scheduler.load_state_dict(sched_state)
            else:  # continued with a new horizon: keep the new schedule, restore its position
                self.scheduler.last_epoch = sched_state.get("last_epoch", self.scheduler.last_epoch)
                self.scheduler._step_count = sched_state.get("_step_count", self.scheduler._step_count)
                self._log(f"scheduler continues at step {self.scheduler.last_epoch} of the new schedule "
                          f"({cfg.epochs} epochs, saved run had {saved_cfg.get('epochs')})")
        if state.get("task") is not None and callable(getattr(self.task, "load_state_dict", None)):
            self.task.load_state_dict(state["task"])
        self.step = int(state["step"])
        self.position = _Position(int(state["epoch"]), int(state.get("batch_in_epoch", 0)))
        same_layout = (state.get("world_size") == self.env.world_size and saved_cfg.get("batch_size") == cfg.batch_size
                       and saved_cfg.get("grad_accum") == cfg.grad_accum and saved_cfg.get("seed") == cfg.seed)
        if self.position.batch and not same_layout:
            self._log(f"{source} stopped mid-epoch with another batch layout (ranks, batch size, grad_accum "
                      "or seed): continuing at the start of the next epoch")
            self.position = _Position(self.position.epoch + 1, 0)
        rng, accums = state.get("rng") or [], state.get("log_accum") or []
        if len(rng) == self.env.world_size:
            set_rng_state(rng[self.env.rank])
            if len(accums) == self.env.world_size:  # this rank's running sums since the last log line
                sums, count = accums[self.env.rank]
                self._resumed_accum = ({k: torch.tensor(v) for k, v in sums.items()}, int(count))
        else:
            seed_everything(sample_seed(cfg.seed, self.step, self.env.rank) % 2**32)
            self._log(f"{source} holds RNG states of {len(rng)} ranks, this run has {self.env.world_size}: reseeded")
        self.last_val = dict(state.get("metrics") or {})
        if own_run:
            self.best = state.get("best")
            self.last_checkpoint = source
            best = self.ckpt_dir / "best.pt"
            self.best_checkpoint = best if self.best and best.exists() else None
        return source

    # ------------------------------------------------------------------ loop
    def _train(self) -> dict[str, Any]:
        cfg = self.config
        self.strategy.model.train()
        # running sums since the last progress line (restored on resume so logged means match)
        self._loss_sum, self._loss_count = self._resumed_accum
        self.last_train_loss: float | None = None
        self._rate = 0.0
        self._reset_rate()
        self._beat("train", force=True)
        while self.position.epoch < cfg.epochs and not self._reached_max_steps():
            self._run_epoch()
        self._beat("done", force=True)
        self._log(f"done: step {self.step}, epoch {self.position.epoch}; last checkpoint {self.last_checkpoint}"
                  + (f"; best {self.best['metric']}={self.best['value']:.6g} at step {self.best['step']}"
                     if self.best else ""))
        return {
            "step": self.step,
            "epoch": self.position.epoch,
            "metrics": dict(self.last_val),
            "train_loss": self.last_train_loss,
            "best": dict(self.best) if self.best else None,
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "out_dir": str(self.out_dir),
        }

    def _reached_max_steps(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def _run_epoch(self) -> None:
        cfg = self.config
        epoch, start = self.position.epoch, self.position.batch
        nb, ga = self.batches_per_epoch, cfg.grad_accum
        self.sampler.set_position(epoch, start * cfg.batch_size)
        self.loader_gen.manual_seed(sample_seed(cfg.seed, epoch, self.env.rank))
        b = start
        for batch in self.train_loader if start < nb else ():
            cycle_start = (b // ga) * ga
            cycle_len = min(ga, nb - cycle_start)
            is_boundary = b + 1 == cycle_start + cycle_len
            self._micro_step(batch, is_boundary, 1.0 / cycle_len)
            b += 1
            if not is_boundary:
                continue
            self.step += 1
            if self.scheduler is not None:
                self.scheduler.step()
            self.position = _Position(epoch, b)
            last_of_epoch, final = b >= nb, self._reached_max_steps()
            if self.step % cfg.log_every == 0 or last_of_epoch or final:
                self._log_train()
            self._beat("train")
            if last_of_epoch or final:
                break  # the epoch-end save below covers this step
            if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                self._save({}, improved=False, reason="periodic")
            self._check_signals()
        epoch_done = b >= nb
        final = epoch_done and epoch + 1 >= cfg.epochs or self._reached_max_steps()
        metrics: dict[str, float] = {}
        if self.val_loader is not None and (final or (epoch_done and (epoch + 1) % cfg.validate_every_epochs == 0)):
            metrics = self._validate()
        self.position = _Position(epoch + 1, 0) if epoch_done else _Position(epoch, b)
        improved = self._update_best(metrics)
        self._save(metrics, improved=improved, reason="epoch" if epoch_done else "max_steps")
        if self.dist.is_main and cfg.plot:
            try:
                plot_losses(self.metrics_csv, self.out_dir / "losses.png")
            except Exception as exc:  # a plot must never kill a training run
                print(f"[engine] losses.png not written: {exc}", file=sys.stderr, flush=True)
        self._reset_rate()
        if not final:  # a signal after the last save of a finished run changes nothing
            self._check_signals()

    def _micro_step(self, batch: Any, is_boundary: bool, scale: float) -> None:
        with self.strategy.boundary(is_boundary):
            with autocast(self.device, self.precision):
                out = self.task.training_step(self.strategy.model, batch)
            loss, extras = _loss_and_scalars(out)
            self.strategy.backward(loss * scale if scale != 1.0 else loss)
        self.strategy.step(is_boundary)
        for name, value in (("loss", loss), *extras.items()):
            value = value.detach().float().mean() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self._loss_sum[name] = self._loss_sum.get(name, 0.0) + value
        self._loss_count += 1

    # ------------------------------------------------------------------ logging
    def _reset_rate(self) -> None:
        self._rate_t0, self._rate_step0 = time.monotonic(), self.step

    def _epoch_progress(self) -> float:
        return self.position.epoch + self.position.batch / self.batches_per_epoch

    def _log_train(self) -> None:
        cfg = self.config
        local = {k: _scalar(v) / max(1, self._loss_count) for k, v in sorted(self._loss_sum.items())}
        self._loss_sum, self._loss_count = {}, 0
        values = self.dist.mean(local)
        values["lr"] = float(self.strategy.optimizer.param_groups[0]["lr"])
        self.last_train_loss = values.get("loss")
        elapsed = time.monotonic() - self._rate_t0
        if self.step > self._rate_step0 and elapsed > 0:
            self._rate = (self.step - self._rate_step0) / elapsed
        self._rate_t0, self._rate_step0 = time.monotonic(), self.step
        samples = self._rate * cfg.batch_size * cfg.grad_accum * self.env.world_size
        if not self.dist.is_main:
            return
        epoch = self._epoch_progress()
        self.metrics_csv.log(self.step, epoch, "train", values)
        if self.tb is not None:
            self.tb.log(self.step, "train", values)
        eta = (self.total_steps - self.step) / self._rate if self._rate > 0 else None
        extras = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in ("loss", "lr"))
        self._log(f"epoch {self.position.epoch + 1}/{cfg.epochs} step {self.step}/{self.total_steps} "
                  f"loss {values['loss']:.5g} lr {values['lr']:.3g}{' ' + extras if extras else ''} | "
                  f"{self._rate:.2f} steps/s {samples:.1f} samples/s | eta {format_duration(eta)}")

    def _beat(self, phase: str, force: bool = False) -> None:
        if self.heartbeat is None:
            return
        cfg = self.config
        self.heartbeat.beat(step=self.step, epoch=self._epoch_progress(), loss=self.last_train_loss,
                            rate=self._rate, samples_per_s=self._rate * cfg.batch_size * cfg.grad_accum * self.env.world_size,
                            phase=phase, force=force)

    # ------------------------------------------------------------------ validation / best
    def _validate(self) -> dict[str, float]:
        self._beat("validate", force=True)
        module = self.strategy.module

        def run() -> dict[str, float]:
            module.eval()
            try:
                with torch.no_grad(), autocast(self.device, self.precision):
                    result = self.task.validate(module, self.val_loader)
                return {k: _scalar(v) for k, v in dict(result or {}).items()}
            finally:
                self.strategy.model.train()

        if self.config.validate_on == "all":
            metrics = self.dist.broadcast(run())
        else:
            metrics = self.dist.on_main(run)
        self.last_val = metrics
        if self.dist.is_main and metrics:
            self.metrics_csv.log(self.step, float(self.position.epoch + 1), "val", metrics)
            if self.tb is not None:
                self.tb.log(self.step, "val", metrics)
            self._log("validation: " + " ".join(f"{k} {v:.5g}" for k, v in metrics.items()))
        self._reset_rate()
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> bool:
        name = self.config.best_metric
        if not name or name not in metrics or not math.isfinite(metrics[name]):
            if name and metrics and name not in metrics:
                self._log(f"best_metric {name!r} is not among the validation metrics {sorted(metrics)}")
            return False
        value = metrics[name]
        better = (self.best is None or (value > self.best["value"] if self.config.best_mode == "max"
                                        else value < self.best["value"]))
        if better:
            self.best = {"metric": name, "value": value, "step": self.step, "mode": self.config.best_mode}
        return better

    # ------------------------------------------------------------------ checkpoints / signals
    def _save(self, metrics: dict[str, float], *, improved: bool, reason: str) -> Path:
        cfg = self.config
        self._beat("checkpoint", force=True)
        name = f"step-{self.step:08d}"
        path = self.ckpt_dir / f"{name}.pt"
        # every rank's own RNG streams and running log sums, restored per rank on resume
        per_rank = self.dist.all_gather((get_rng_state(),
                                         ({k: _scalar(v) for k, v in self._loss_sum.items()}, self._loss_count)))
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        shards = self.strategy.save_shards(self.ckpt_dir / f"{name}.ds")  # DeepSpeed: every rank writes
        self.dist.barrier()

        def write() -> None:
            state = {
                "format": STATE_FORMAT,
                "model": self.strategy.module.state_dict(),
                **self.strategy.checkpoint_state(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "task": self.task.state_dict() if callable(getattr(self.task, "state_dict", None)) else None,
                "step": self.step,
                "epoch": self.position.epoch,
                "batch_in_epoch": self.position.batch,
                "steps_per_epoch": self.steps_per_epoch,
                "rng": [rng for rng, _ in per_rank],
                "best": self.best,
                "log_accum": [accum for _, accum in per_rank],
                "metrics": metrics or self.last_val,
                "strategy": self.strategy.name,
                "world_size": self.env.world_size,
                "deepspeed_dir": shards.name if shards else None,
                "config": cfg.to_dict(),
            }
            meta = {"reason": reason, "batch_in_epoch": self.position.batch, "strategy": self.strategy.name,
                    "world_size": self.env.world_size, "best": self.best, "train_loss": self.last_train_loss,
                    "job_id": self.env.job_id, "restart_count": self.env.restart_count}
            save_checkpoint(path, state, step=self.step, epoch=self.position.epoch, metrics=metrics, meta=meta,
                            companions=[shards] if shards else ())
            link_checkpoint(path, self.ckpt_dir / "last.pt")
            if improved:
                link_checkpoint(path, self.ckpt_dir / "best.pt")
            prune(self.ckpt_dir, keep=cfg.keep_last, orphans="step-*.ds")
            self._log(f"checkpoint {path} ({reason})" + (" = new best" if improved else ""))

        self.dist.on_main(write)
        if improved:
            self.best_checkpoint = self.ckpt_dir / "best.pt"
        self.last_checkpoint = path
        self._reset_rate()
        return path

    def _check_signals(self) -> None:
        bits = self.dist.max_int([self.flag.bits])[0]
        if not bits:
            return
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step:08d}.pt":
            self._save({}, improved=False, reason="signal")
        requeue = bool(bits & REQUEUE)
        signum = self.flag.requeue_signum if requeue else int(signal.SIGTERM)
        requeued, cause = False, None
        if requeue and self.dist.is_main and self.env.is_slurm:
            cause = self.env.stop_cause()  # before the requeue: it resets the job's times
        if requeue and self.config.requeue and self.dist.is_main and self.env.is_slurm:
            requeued = self.env.requeue()
        requeued = bool(self.dist.broadcast(requeued))
        self._beat("requeued" if requeue else "terminated", force=True)
        kind = Requeued if requeue else Terminated
        what = ("requeued" if requeued else "requeue signal, not requeued (not under Slurm or refused)") \
            if requeue else "terminated"
        message = f"{what} at step {self.step} after writing {self.last_checkpoint}"
        self._log(message)
        raise kind(message, step=self.step, epoch=self.position.epoch, checkpoint=self.last_checkpoint,
                   signal=signum, requeued=requeued, cause=cause)
