"""sensorium: Sensorium 2023 mouse visual cortex prediction (1st place, DwiseNeuro), the seed's
two experiments and their ensemble as one command.

    download (login node) -> train[fold 0..6] (experiment true_batch_001: an array, one task per fold)
      -> distill[fold 0..6] (experiment distillation_001: task k starts from fresh weights with
         train task k's best checkpoint as its teacher; aftercorr: each waits for its own fold only)
      -> predict[experiment x split] (out-of-fold predictions, and the four unlabeled splits with
         the mean of the fold models; waits for every fold)
      -> ensemble (the mean of the two experiments; out-of-fold correlations into metrics.json)

Fold k validates on the trials the seed's split puts in fold k and trains on the other folds.
Every fold task trains through the shared engine (checkpoints, resume, requeue on the signal,
AMP on GPUs, ``iter_size`` as gradient accumulation); the task keeps an EMA of the weights in its
state, so the EMA travels in every checkpoint and resumes with it, and the validation
correlation that picks ``best.pt`` is the EMA model's. Each validation also writes the EMA weights
as the seed names them, ``model-{epoch:03d}-{val_corr:.6f}.pth``.

Config keys follow the seed's config (``train.batch_size``, ``train.num_epochs=[3,18]``,
``distill.experiment``, ``distill.ratio``...). With no data configured, ``download`` writes the
synthetic set (2 mice, tens of neurons) in the real layout and says so; the ``tiny`` preset (the
default then) runs the whole chain in minutes on 2 CPU cores. ``--set data.root=...`` selects
the real data and the ``paper`` preset (the seed's sizes). ``--set train.epochs=0`` skips
training everywhere: each fold hands on its initial weights, and the chain measures an
untrained model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register
from hpc_jobs.errors import UserError
from hpc_jobs.fsutil import build_lock

UNLABELED_SPLITS = ("live_test_main", "live_test_bonus", "final_test_main", "final_test_bonus")
PREDICT_SPLITS = ("out_of_fold",) + UNLABELED_SPLITS
#: fault drills: the train tasks of these folds (comma-separated) fail at start (tests of resume)
FAIL_FOLDS_ENV = "SENSORIUM_FAIL_FOLDS"


# -- config ------------------------------------------------------------------------------------------
@dataclass
class DataOptions:
    root: Optional[str] = None        # the sensorium_all_2023 directory (one folder per mouse); unset: synthetic
    synthetic: Literal["auto", "yes", "no"] = "auto"  # auto: only when root is not set
    synthetic_preset: Literal["tiny", "full"] = "tiny"
    mice: List[str] = field(default_factory=list)  # a subset of the mice (default: every mouse found)
    num_folds: int = 7
    base_url: Optional[str] = None    # a mirror holding <mouse>.zip (default: the seed's GIN repositories)
    no_network: bool = False          # never download: fail naming what is missing


@dataclass
class ModelOptions:
    """The seed's ``dwiseneuro`` arguments and input processing."""

    image_size: List[int] = field(default_factory=lambda: [64, 64])
    frame_stack_size: int = 16
    frame_stack_step: int = 2
    core_features: List[int] = field(default_factory=lambda: [64, 64, 64, 64, 128, 128, 128, 256, 256])
    spatial_strides: List[int] = field(default_factory=lambda: [2, 1, 1, 1, 2, 1, 1, 2, 1])
    spatial_kernel: int = 3
    temporal_kernel: int = 5
    expansion_ratio: int = 6
    se_reduce_ratio: int = 32
    cortex_features: List[int] = field(default_factory=lambda: [1024, 2048, 4096])
    cortex_pool: List[int] = field(default_factory=lambda: [8, 8])
    groups: int = 2
    softplus_beta: float = 0.07
    drop_rate: float = 0.4
    drop_path_rate: float = 0.1


@dataclass
class TrainOptions:
    """What both experiments train with (the seed's config of ``true_batch_001``)."""

    experiment: str = "true_batch_001"
    batch_size: int = 32
    base_lr: float = 3e-4             # lr = base_lr * batch_size / 4 (the seed's get_lr)
    min_base_lr: float = 3e-6         # the cosine's floor, scaled the same way
    ema_decay: float = 0.999
    train_epoch_size: int = 72000     # samples per epoch
    num_epochs: List[int] = field(default_factory=lambda: [3, 18])  # [warm-up, cosine] epochs
    epochs: Optional[int] = None      # set: this many epochs in all (warm-up kept if shorter); 0: no training
    weight_decay: float = 0.05
    iter_size: int = 1                # gradient accumulation: micro-batches of batch_size / iter_size
    cutmix_alpha: float = 1.0
    cutmix_prob: float = 0.5
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: AMP on GPUs, fp32 on CPUs
    seed: int = 0                     # fold k trains with seed + k
    num_workers: Optional[int] = None
    num_threads: Optional[int] = None
    log_every: int = 100
    max_steps: Optional[int] = None
    checkpoint_every_steps: int = 0
    tensorboard: bool = True
    plot: bool = True
    gpus: int = 1                     # per fold task: the seed trains each fold on one GPU
    cpus: int = 8
    mem: str = "64G"
    time: str = "1-00:00:00"
    max_parallel: int = 4             # fold tasks running at once (the array's %K throttle); 0: no limit


@dataclass
class DistillOptions:
    """The seed's ``distill`` block (config ``distillation_001``)."""

    name: str = "distillation_001"    # this experiment's name
    experiment: str = "true_batch_001"  # the teacher experiment: must be train.experiment
    ratio: float = 0.36               # the teacher-filled targets' share of the loss
    epochs: Optional[int] = None      # as train.epochs, for the distillation only


@dataclass
class PredictOptions:
    batch_size: int = 16              # windows per forward pass
    gpus: int = 1
    cpus: int = 4
    mem: str = "32G"
    time: str = "04:00:00"


@dataclass
class MetricOptions:
    skip_first: int = 50              # the seed's submission_skip_first
    last_frame: int = 300


@dataclass
class SensoriumConfig:
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    predict: PredictOptions = field(default_factory=PredictOptions)
    metric: MetricOptions = field(default_factory=MetricOptions)
    ensemble_cpus: int = 2
    ensemble_mem: str = "16G"
    ensemble_time: str = "01:00:00"

    def validate(self) -> None:
        d, m, t, s = self.data, self.model, self.train, self.distill
        if d.num_folds < 2:
            raise UserError(f"data.num_folds={d.num_folds}: need at least 2 (fold k validates, the others train)")
        if len(m.image_size) != 2 or len(m.cortex_pool) != 2:
            raise UserError(f"model.image_size={m.image_size} and model.cortex_pool={m.cortex_pool} must be [H, W]")
        if len(m.core_features) != len(m.spatial_strides):
            raise UserError(f"model.core_features has {len(m.core_features)} blocks, model.spatial_strides "
                            f"{len(m.spatial_strides)}: give one stride per block")
        if any(w % m.groups for w in m.cortex_features):
            raise UserError(f"model.cortex_features={m.cortex_features}: each must be a multiple of model.groups={m.groups}")
        if len(t.num_epochs) != 2 or min(t.num_epochs) < 0:
            raise UserError(f"train.num_epochs={t.num_epochs}: give [warm-up epochs, cosine epochs], e.g. [3, 18]")
        if t.batch_size % t.iter_size:
            raise UserError(f"train.batch_size={t.batch_size} is not a multiple of train.iter_size={t.iter_size}")
        if s.experiment != t.experiment:
            raise UserError(f"distill.experiment='{s.experiment}' names the teacher experiment, which in this "
                            f"pipeline is the train stage's: set it to train.experiment ('{t.experiment}')")
        if s.name == t.experiment:
            raise UserError(f"distill.name='{s.name}' equals train.experiment: give the two experiments different names")
        if not 0.0 <= s.ratio < 1.0:
            raise UserError(f"distill.ratio={s.ratio} must lie in [0, 1): the teacher targets' share of the loss")
        if not 0 <= self.metric.skip_first < self.metric.last_frame:
            raise UserError(f"metric.skip_first={self.metric.skip_first} must be below metric.last_frame={self.metric.last_frame}")
        if d.root is not None and not Path(d.root).expanduser().is_dir() and d.no_network:
            raise UserError(f"data.root '{d.root}' does not exist and data.no_network=true forbids the download")
        if d.synthetic == "yes" and d.root is not None:
            raise UserError("data.synthetic=yes with data.root set: drop one of them")


PRESETS: Dict[str, Dict[str, Any]] = {
    # The seed's configs (the dataclass defaults): 64x64 frames, 16-frame stacks, features up to
    # 256, batch 32, lr 3e-4, epochs [3, 18] of 72,000 samples, one GPU per fold.
    "paper": {},
    # Sized for the synthetic set and 2 CPU cores: 7 folds x 2 experiments in a few minutes.
    "tiny": {
        "data": {"synthetic_preset": "tiny"},
        "model": {"image_size": [16, 32], "frame_stack_size": 8, "frame_stack_step": 1,
                  "core_features": [8, 16], "spatial_strides": [2, 2], "temporal_kernel": 3,
                  "expansion_ratio": 2, "se_reduce_ratio": 4, "cortex_features": [64, 64],
                  "cortex_pool": [4, 8], "softplus_beta": 1.0, "drop_rate": 0.1, "drop_path_rate": 0.05},
        "train": {"batch_size": 8, "base_lr": 2e-3, "min_base_lr": 2e-5, "ema_decay": 0.99,
                  "train_epoch_size": 320, "num_epochs": [1, 2], "num_workers": 0, "num_threads": 1, "log_every": 10,
                  "tensorboard": False, "plot": False, "cpus": 1, "mem": "2G", "time": "00:30:00",
                  "max_parallel": 0},
        "predict": {"batch_size": 16, "cpus": 1, "mem": "2G", "time": "00:20:00"},
        "metric": {"skip_first": 8, "last_frame": 64},
        "ensemble_cpus": 1, "ensemble_mem": "2G", "ensemble_time": "00:10:00",
    },
}


def total_epochs(cfg: SensoriumConfig, stage: str) -> int:
    override = cfg.distill.epochs if stage == "distill" and cfg.distill.epochs is not None else cfg.train.epochs
    return sum(cfg.train.num_epochs) if override is None else int(override)


def experiment_of(cfg: SensoriumConfig, stage: str) -> str:
    return cfg.train.experiment if stage == "train" else cfg.distill.name


# -- stage functions (run inside jobs; heavy imports stay inside) ------------------------------------------
def _say(ctx, message: str) -> None:
    if ctx.env is None or ctx.env.is_main:
        print(message, flush=True)


def _data_root(ctx) -> Path:
    cfg = ctx.config
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    if cfg.data.synthetic == "no":
        return ctx.data_root / "sensorium"
    return ctx.data_root / "sensorium-synthetic" / cfg.data.synthetic_preset


def download(ctx) -> Dict[str, Any]:
    """Login node: the ten mice (resumable, verified) or the synthetic set; then the per-mouse
    normalisation statistics every later stage uses."""
    from data.sensorium import download as dl
    from data.sensorium import layout, synthetic
    from data.sensorium.dataset import mouse_stats

    cfg = ctx.config
    root = _data_root(ctx)
    if cfg.data.synthetic == "yes" or (cfg.data.synthetic == "auto" and cfg.data.root is None):
        print(f"sensorium: no Sensorium data configured: using the SYNTHETIC set in {root} "
              f"(set data.root=... for the real data)", flush=True)
        with build_lock(root):  # another launch may be writing it now: wait, then reuse it
            synthetic.generate(root, preset=cfg.data.synthetic_preset, seed=cfg.train.seed)
        kind = "synthetic"
    else:
        dl.download_all(root, mice=cfg.data.mice or None, base_url=cfg.data.base_url, no_network=cfg.data.no_network,
                        progress=lambda mouse, done, total: ctx.heartbeat(step=done, total_steps=total, phase=mouse))
        kind = "real"
    names = cfg.data.mice or layout.list_mice(root)
    mice = layout.load_mice(root, cfg.data.num_folds, names)
    record = {"root": str(root), "kind": kind, "num_folds": cfg.data.num_folds,
              "mice": [m.name for m in mice], "neurons": [m.num_neurons for m in mice],
              "stats": {m.name: mouse_stats(m, m.labeled_trials()) for m in mice}}
    ctx.output("dataset").write_text(json.dumps(record, indent=1))
    return {"root": str(root), "kind": kind, "mice": len(mice), "neurons": sum(record["neurons"])}


class SensoriumData:
    """The download stage's record as objects: mice, readers, neuron rows of each mouse."""

    def __init__(self, cfg: SensoriumConfig, record_path: Path) -> None:
        from data.sensorium import layout
        from data.sensorium.dataset import TrialReader

        self.record = json.loads(Path(record_path).read_text())
        self.mice = layout.load_mice(Path(self.record["root"]), self.record["num_folds"], self.record["mice"])
        self.readers = [TrialReader(m, self.record["stats"][m.name], tuple(cfg.model.image_size)) for m in self.mice]
        self.neurons = [m.num_neurons for m in self.mice]
        self.slices, start = [], 0
        for n in self.neurons:
            self.slices.append(slice(start, start + n))
            start += n


def build_network(cfg: SensoriumConfig, neurons: List[int]):
    from models.sensorium import build_model

    m = cfg.model
    return build_model(neurons, core_features=tuple(m.core_features), spatial_strides=tuple(m.spatial_strides),
                       spatial_kernel=m.spatial_kernel, temporal_kernel=m.temporal_kernel,
                       expansion_ratio=m.expansion_ratio, se_reduce_ratio=m.se_reduce_ratio,
                       cortex_features=tuple(m.cortex_features), cortex_pool=tuple(m.cortex_pool), groups=m.groups,
                       softplus_beta=m.softplus_beta, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate)


def load_ema_weights(model, checkpoint: Path) -> Dict[str, Any]:
    """Load the EMA weights a fold checkpoint carries (its task state), else its raw weights."""
    from hpc_jobs.checkpoint import load_checkpoint, read_manifest

    state = load_checkpoint(checkpoint)
    ema = ((state.get("task") or {}).get("ema") or {}).get("module")
    model.load_state_dict(ema if ema is not None else state["model"])
    manifest = read_manifest(checkpoint)
    return {"epoch": manifest.epoch, "step": manifest.step, "val_corr": manifest.metrics.get("val_corr"),
            "ema": ema is not None}


def predict_pairs(model, data: SensoriumData, pairs, cfg: SensoriumConfig, device, autocast=None):
    """{(mouse index, trial): (neurons, length) prediction} for every pair."""
    from data.sensorium.dataset import predict_trial

    m = cfg.model
    return {(mi, t): predict_trial(model, data.readers[mi], data.slices[mi], t, m.frame_stack_size,
                                   m.frame_stack_step, device, cfg.predict.batch_size, autocast)
            for mi, t in pairs}


def score_pairs(predictions, data: SensoriumData, cfg: SensoriumConfig) -> Dict[str, Any]:
    """The metric over the predicted labeled trials: mean over neurons, then mice."""
    from data.sensorium.metrics import correlation

    per_mouse: Dict[str, tuple] = {}
    for (mi, t), pred in sorted(predictions.items()):
        preds, trues = per_mouse.setdefault(data.mice[mi].name, ([], []))
        preds.append(pred)
        trues.append(data.readers[mi].responses(t))
    return correlation(per_mouse, cfg.metric.skip_first, cfg.metric.last_frame)


class SensoriumTask:
    """The engine's TrainTask for one fold of either experiment. Holds the EMA (its state is the
    task state the engine checkpoints) and, for distillation, the frozen teacher."""

    def __init__(self, cfg: SensoriumConfig, data: SensoriumData, fold: int, out_dir: Path,
                 teacher: Optional[Path] = None, is_main: bool = True) -> None:
        self.cfg, self.data, self.fold, self.out_dir = cfg, data, fold, Path(out_dir)
        self.teacher_path, self.is_main = teacher, is_main
        self.teacher = None
        self.ema = None
        self.validated = 0  # validations done: the epoch in the seed-style file names

    def build_model(self):
        return build_network(self.cfg, self.data.neurons)

    def build_optimizer(self, model):
        import torch

        from models.ema import ModelEma

        t = self.cfg.train
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.base_lr * t.batch_size / 4, weight_decay=t.weight_decay)
        self.ema = ModelEma(model, t.ema_decay)
        # the EMA moves after every real optimizer step (a step the AMP scaler skips does not count)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.ema.update(model))
        return optimizer

    def build_scheduler(self, optimizer, steps_per_epoch: int, epochs: int):
        import torch

        t = self.cfg.train
        warm = min(t.num_epochs[0], max(0, epochs - 1)) * steps_per_epoch
        total = max(1, epochs * steps_per_epoch)
        floor = t.min_base_lr / t.base_lr

        def factor(step: int) -> float:  # linear warm-up, then cosine down to min_base_lr
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def train_dataset(self):
        from data.sensorium.dataset import TrainWindows

        m, t = self.cfg.model, self.cfg.train
        trials = [mouse.train_trials(self.fold) for mouse in self.data.mice]
        return TrainWindows(self.data.readers, trials, m.frame_stack_size, m.frame_stack_step, t.train_epoch_size)

    def val_pairs(self):
        return [(mi, t) for mi, mouse in enumerate(self.data.mice) for t in mouse.trials(f"fold_{self.fold}")]

    def val_dataset(self):
        from data.sensorium.dataset import TrialIndex

        return TrialIndex(self.val_pairs())

    def _teacher(self, device):
        if self.teacher is None and self.teacher_path is not None:
            self.teacher = build_network(self.cfg, self.data.neurons)
            load_ema_weights(self.teacher, self.teacher_path)
            self.teacher.to(device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return self.teacher

    def training_step(self, model, batch):
        import torch

        from data.sensorium.dataset import cutmix
        from models.sensorium import fill_with_teacher, mice_poisson_loss

        inputs, targets, weights = batch
        scalars = {}
        teacher = self._teacher(inputs.device)
        if teacher is not None:
            with torch.no_grad():
                teacher_out = teacher(inputs).float()
            targets, weights = fill_with_teacher(targets, weights, teacher_out, self.data.slices,
                                                 self.cfg.distill.ratio)
            scalars["teacher_share"] = (weights * (batch[2] <= 0)).sum() / weights.sum()
        t = self.cfg.train
        inputs, targets, weights = cutmix(inputs, targets, weights, self.data.slices, t.cutmix_alpha, t.cutmix_prob)
        loss = mice_poisson_loss(model(inputs), targets, weights, self.data.slices)
        return {"loss": loss, **scalars}

    def validate(self, model, loader):
        """The EMA model's correlation on this fold's trials (the engine hands the raw model: unused)."""
        import torch

        device = next(model.parameters()).device
        pairs = [tuple(int(v) for v in row) for batch in loader for row in batch.reshape(-1, 2).tolist()]
        net = self.ema.module if self.ema is not None else model
        net.eval()
        score = score_pairs(predict_pairs(net, self.data, pairs, self.cfg, device), self.data, self.cfg)
        self.validated += 1
        if self.is_main:  # the seed's file names: the best is the highest score in a name
            path = self.out_dir / f"model-{self.validated:03d}-{score['correlation']:.6f}.pth"
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
        return {"val_corr": score["correlation"],
                **{f"val_corr_{i}": v for i, v in enumerate(score["mice"].values())}}

    def state_dict(self) -> Dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None, "validated": self.validated}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state and state.get("ema") is not None and self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.validated = int((state or {}).get("validated", 0))


def engine_config(cfg: SensoriumConfig, stage: str, fold: int):
    from hpc_jobs.engine import TrainConfig

    t = cfg.train
    return TrainConfig(
        epochs=total_epochs(cfg, stage), batch_size=t.batch_size // t.iter_size, grad_accum=t.iter_size,
        lr=t.base_lr * t.batch_size / 4, precision=t.precision, seed=t.seed + fold, num_workers=t.num_workers,
        num_threads=t.num_threads, checkpoint_every_steps=t.checkpoint_every_steps, log_every=t.log_every,
        max_steps=t.max_steps, best_metric="val_corr", best_mode="max", tensorboard=t.tensorboard, plot=t.plot,
    )


def best_model_path(directory: Path):
    """The seed's rule: among ``*.pth`` whose name ends ``-<score>.pth``, the highest score."""
    import re

    scored = []
    for path in Path(directory).glob("*.pth"):
        match = re.search(r"-(\d+(?:\.\d+)?)\.pth$", path.name)
        if match:
            scored.append((float(match.group(1)), path.name, path))
    return max(scored)[2] if scored else None


def train(ctx) -> Dict[str, Any]:
    """One fold of ``train`` (true_batch_001) or ``distill`` (distillation_001): fold
    ``ctx.task_index`` validates on fold k. ``distill`` starts from fresh weights and learns from
    train fold k's best checkpoint (``ctx.inputs["teacher"]``, this task's own fold)."""
    import os

    from hpc_jobs.engine import Trainer

    cfg, stage = ctx.config, ctx.stage
    fold = ctx.task_index or 0
    drill = os.environ.get(FAIL_FOLDS_ENV, "")
    if stage == "train" and str(fold) in drill.split(","):
        raise RuntimeError(f"fault drill: {FAIL_FOLDS_ENV}={drill} makes train fold {fold} fail; "
                           f"unset it and resume the run")
    out_dir = ctx.out_dir / f"fold_{fold}"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = SensoriumData(cfg, ctx.inputs["dataset"])
    teacher = ctx.inputs.get("teacher")
    is_main = ctx.env is None or ctx.env.is_main
    task = SensoriumTask(cfg, data, fold, out_dir, teacher=teacher, is_main=is_main)
    experiment = experiment_of(cfg, stage)
    handoff = None
    if teacher is not None:
        from hpc_jobs.checkpoint import read_manifest

        manifest = read_manifest(teacher)
        handoff = f"teacher train fold {fold}"
        _say(ctx, f"{stage} fold {fold}: teacher = train fold {fold}'s best checkpoint {teacher} (epoch "
                  f"{manifest.epoch}, val_corr {manifest.metrics.get('val_corr')}); fresh weights; teacher "
                  f"targets make up distill.ratio={cfg.distill.ratio} of the loss")
    epochs = total_epochs(cfg, stage)
    if epochs == 0:
        return _hand_on(ctx, task, data, fold, out_dir, experiment, handoff)
    result = Trainer(task, engine_config(cfg, stage, fold), out_dir, env=ctx.env).fit()
    best = result.get("best") or {}
    seed_best = best_model_path(out_dir)
    return {"experiment": experiment, "fold": fold, "step": result["step"], "epoch": result["epoch"],
            "val_corr": best.get("value"), "best_step": best.get("step"), "train_loss": result["train_loss"],
            "best_file": seed_best.name if seed_best else None, "handoff": handoff}


def _hand_on(ctx, task: SensoriumTask, data: SensoriumData, fold: int, out_dir: Path, experiment: str,
             handoff: Optional[str]) -> Dict[str, Any]:
    """No training (epochs=0): the initial weights become the fold's best and last checkpoint
    (validated, so the chain still runs and measures an untrained model)."""
    import torch

    from hpc_jobs.checkpoint import link_checkpoint, save_checkpoint
    from hpc_jobs.engine.distributed import seed_everything

    _say(ctx, f"{ctx.stage} fold {fold}: no training (epochs=0): handing on the initial weights")
    if ctx.env is not None and not ctx.env.is_main:
        return {"experiment": experiment, "fold": fold, "trained": False}
    seed_everything(ctx.config.train.seed + fold)
    model = task.build_model()
    model.eval()
    score = score_pairs(predict_pairs(model, data, task.val_pairs(), ctx.config, torch.device("cpu")), data, ctx.config)
    weights = model.state_dict()
    path = out_dir / "checkpoints" / "step-00000000.pt"
    save_checkpoint(path, {"format": 1, "model": weights, "task": {"ema": {"module": weights, "updates": 0}},
                           "step": 0, "epoch": 0}, step=0, epoch=0, metrics={"val_corr": score["correlation"]},
                    meta={"weights_only": True, "reason": "epochs=0"})
    link_checkpoint(path, out_dir / "checkpoints" / "last.pt")
    link_checkpoint(path, out_dir / "checkpoints" / "best.pt")
    return {"experiment": experiment, "fold": fold, "trained": False, "val_corr": score["correlation"],
            "handoff": handoff}


def predict(ctx) -> Dict[str, Any]:
    """Task i: experiment i // 5, split i % 5. ``out_of_fold``: each fold model predicts its own
    validation trials; an unlabeled split: the mean of every fold model's predictions."""
    import numpy as np
    import torch

    from hpc_jobs.engine.config import resolve_precision
    from hpc_jobs.engine.strategy import autocast

    cfg = ctx.config
    task = ctx.task_index or 0
    stage, split = ("train", "distill")[task // len(PREDICT_SPLITS)], PREDICT_SPLITS[task % len(PREDICT_SPLITS)]
    experiment = experiment_of(cfg, stage)
    data = SensoriumData(cfg, ctx.inputs["dataset"])
    checkpoints = ctx.inputs["train_models" if stage == "train" else "distill_models"]
    checkpoints = checkpoints if isinstance(checkpoints, list) else [checkpoints]
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.predict.gpus else "cpu")
    precision = resolve_precision(cfg.train.precision, device.type,
                                  device.type == "cuda" and torch.cuda.is_bf16_supported())
    amp = (lambda: autocast(device, precision)) if precision != "fp32" else None
    model = build_network(cfg, data.neurons).to(device)
    predictions: Dict[tuple, Any] = {}
    used = []
    for fold, path in enumerate(checkpoints):
        info = load_ema_weights(model, path)
        model.eval()
        used.append({"fold": fold, "checkpoint": str(path), **info})
        if split == "out_of_fold":
            pairs = [(mi, t) for mi, mouse in enumerate(data.mice) for t in mouse.trials(f"fold_{fold}")]
            predictions.update(predict_pairs(model, data, pairs, cfg, device, amp))
        else:
            pairs = [(mi, t) for mi, mouse in enumerate(data.mice) for t in mouse.trials(split)]
            for key, pred in predict_pairs(model, data, pairs, cfg, device, amp).items():
                predictions[key] = predictions.get(key, 0) + pred / len(checkpoints)
    out = ctx.out_dir / experiment / f"{split}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{f"{data.mice[mi].name}/{t}": p for (mi, t), p in predictions.items()})
    result: Dict[str, Any] = {"experiment": experiment, "split": split, "trials": len(predictions)}
    if split == "out_of_fold":
        result["correlation"] = score_pairs(predictions, data, cfg)["correlation"]
    marker = ctx.output("predictions")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**result, "path": str(out), "models": used}, indent=1))
    _say(ctx, f"predict {experiment} {split}: {len(predictions)} trials"
         + (f", out-of-fold correlation {result['correlation']:.4f}" if "correlation" in result else ""))
    return result


def ensemble(ctx) -> Dict[str, Any]:
    """The mean of the two experiments' predictions per split; the out-of-fold correlation of each
    experiment and of the ensemble (and, where the responses exist, of each unlabeled split)."""
    import numpy as np

    from data.sensorium.metrics import correlation

    cfg = ctx.config
    data = SensoriumData(cfg, ctx.inputs["dataset"])
    records = [json.loads(Path(p).read_text()) for p in ctx.inputs["predictions"]]
    by_split: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    for rec in records:
        with np.load(rec["path"]) as npz:
            by_split.setdefault(rec["split"], {})[rec["experiment"]] = {k: npz[k] for k in npz.files}
    experiments = [cfg.distill.name, cfg.train.experiment]
    name = ",".join(experiments)  # the seed's folder name for the ensemble
    metrics: Dict[str, Any] = {"experiments": experiments, "ensemble": name, "splits": {}}
    mouse_index = {m.name: i for i, m in enumerate(data.mice)}
    for split, preds in by_split.items():
        missing = [e for e in experiments if e not in preds]
        if missing:
            raise RuntimeError(f"ensemble: no {split} predictions of {missing}: did every predict task complete?")
        mean = {k: (preds[experiments[0]][k] + preds[experiments[1]][k]) / 2 for k in preds[experiments[0]]}
        out = ctx.out_dir / name / f"{split}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **mean)
        scored: Dict[str, Any] = {}
        for label, table in [(e, preds[e]) for e in experiments] + [("ensemble", mean)]:
            per_mouse: Dict[str, tuple] = {}
            for key in sorted(table, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
                mouse, trial = key.split("/")
                mi = mouse_index[mouse]
                if not data.mice[mi].has_responses(int(trial)):
                    continue
                p, r = per_mouse.setdefault(mouse, ([], []))
                p.append(table[key])
                r.append(data.readers[mi].responses(int(trial)))
            if per_mouse:
                scored[label] = correlation(per_mouse, cfg.metric.skip_first, cfg.metric.last_frame)
        metrics["splits"][split] = {"trials": len(mean), "path": str(out), **scored}
    oof = metrics["splits"].get("out_of_fold", {})
    metrics["out_of_fold"] = {label: oof[label]["correlation"] for label in experiments + ["ensemble"] if label in oof}
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    line = ", ".join(f"{k} {v:.4f}" for k, v in metrics["out_of_fold"].items())
    _say(ctx, f"sensorium ensemble: out-of-fold correlation: {line}")
    return {"out_of_fold": metrics["out_of_fold"]}


# -- the launcher object -------------------------------------------------------------------------------------
@register
class Sensorium(Workflow):
    name = "sensorium"
    summary = ("Sensorium 2023 (1st place, DwiseNeuro): 7-fold train array -> per-fold distillation array -> "
               "predictions per split -> ensemble, per-neuron correlation")
    Config = SensoriumConfig
    presets = PRESETS
    requires = ("torch", "numpy", "scipy")
    default_preset = "tiny"  # the generated data set
    data_key, real_data_preset = "data.root", "paper"  # real data: the seed's settings

    def build(self) -> Pipeline:
        cfg, opts = self.config, self.options
        t, p = cfg.train, cfg.predict
        folds = cfg.data.num_folds
        gpus = opts.gpus if opts.gpus_given else t.gpus
        fold_res = Resources(gpus_per_node=gpus, tasks_per_node=1, cpus_per_task=t.cpus, mem=t.mem, time=t.time)
        pred_gpus = min(1, opts.gpus) if opts.gpus_given else p.gpus
        pred_res = Resources(gpus_per_node=pred_gpus, tasks_per_node=1, cpus_per_task=p.cpus, mem=p.mem, time=p.time)
        throttle = t.max_parallel if 0 < t.max_parallel < folds else None
        dataset = Input("download", "dataset")
        fold_outputs = {"best": "fold_{task}/checkpoints/best.pt", "last": "fold_{task}/checkpoints/last.pt"}
        stages = [
            Stage("download", download, where="login", outputs={"dataset": "dataset.json"},
                  description="the ten mice (or the synthetic set) + normalisation stats; login node"),
            Stage("train", train, resources=fold_res, array=folds, array_parallelism=throttle,
                  inputs={"dataset": dataset}, outputs=dict(fold_outputs),
                  description=f"{t.experiment}: fold k of {folds} validates on fold k, "
                              f"{total_epochs(cfg, 'train')} epochs, best by EMA val_corr"),
            Stage("distill", train, resources=fold_res, array=folds, array_parallelism=throttle,
                  inputs={"dataset": dataset, "teacher": Input("train", "best", kind="init", per_task=True)},
                  outputs=dict(fold_outputs),
                  description=f"{cfg.distill.name}: fold k from fresh weights, teacher = train fold k's best "
                              f"(ratio {cfg.distill.ratio})"),
            Stage("predict", predict, resources=pred_res, array=2 * len(PREDICT_SPLITS),
                  inputs={"dataset": dataset, "train_models": Input("train", "best", kind="init"),
                          "distill_models": Input("distill", "best", kind="init")},
                  outputs={"predictions": "tasks/{task}.json"},
                  description="per experiment x split: out-of-fold, and the fold models' mean on "
                              + ", ".join(UNLABELED_SPLITS)),
            Stage("ensemble", ensemble,
                  resources=Resources(cpus_per_task=cfg.ensemble_cpus, mem=cfg.ensemble_mem, time=cfg.ensemble_time),
                  inputs={"dataset": dataset, "predictions": Input("predict", "predictions")},
                  outputs={"metrics": "metrics.json"},
                  description="mean of the two experiments; out-of-fold correlation -> metrics.json"),
        ]
        return Pipeline(self.name, stages)
